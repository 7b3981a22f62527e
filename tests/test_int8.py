"""INT8 export (ONNX Runtime static quantization of the detector, by default, and the image encoder)
and its parity report."""

import json
import shutil

import onnx
from click.testing import CliRunner

from fbnet.cli import main
from fbnet.runtime.engine.backends import select_backend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever


def test_int8_default_is_the_detector_and_unknown_graphs_are_refused(bundle, tmp_path):
    int8 = tmp_path / "bundle-int8"
    shutil.copytree(bundle, int8)
    res = CliRunner().invoke(main, ["export", str(int8), "--int8", "--int8-graphs", "text_encoder"])
    assert res.exit_code != 0 and "cannot quantize text_encoder" in res.output
    res = CliRunner().invoke(main, ["export", str(int8), "--int8", "--calibration-images", "8"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["quantization"]["graphs"] == ["detector"]
    assert manifest["quantization"]["calibration"]["method"] == "minmax"
    assert manifest["graphs"]["image_encoder"]["file"] == "image_encoder.onnx"  # stays float32
    # the default INT8 bundle (the detector) keeps parity with the float32 checkpoint
    out = tmp_path / "parity.json"
    res = CliRunner().invoke(main, ["parity", str(bundle.parent / "run" / "best.pt"), str(int8), "--split", "test",
                                    "--backend", "onnxruntime", "--json", str(out)])
    report = json.loads(out.read_text())
    assert res.exit_code == 0 and report["passed"] and "PASS" in res.output, res.output
    assert report["precision"] == "int8 detector, float32 others" and abs(report["map_diff"]) <= 0.02


def test_int8_export_quantizes_and_parity_reports_the_change(trained, bundle, gallery_inputs, tmp_path):
    int8 = tmp_path / "bundle-int8"
    shutil.copytree(bundle, int8)
    res = CliRunner().invoke(main, ["export", str(int8), "--int8", "--int8-graphs", "detector,image_encoder",
                                    "--calibration-images", "16", "--calibration-method", "percentile"])
    assert res.exit_code == 0, res.output
    assert "calibrated on 16 training images" in res.output
    manifest = json.loads((int8 / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["graphs"] == ["detector", "image_encoder"] and q["calibration"]["images"] == 16
    assert q["calibration"]["method"] == "percentile"
    for graph in q["graphs"]:
        spec = manifest["graphs"][graph]
        assert spec["file"] == f"{graph}.int8.onnx" and spec["float_file"] == f"{graph}.onnx"
        ops = {n.op_type for n in onnx.load(str(int8 / spec["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert (int8 / spec["file"]).stat().st_size < 0.5 * (int8 / spec["float_file"]).stat().st_size
    assert manifest["graphs"]["text_encoder"]["file"] == "text_encoder.onnx"  # the GRU stays float

    # the runtime runs the INT8 graphs (the manifest's checksums hold) and stays close to float32
    images = sorted((gallery_inputs / "images").iterdir())[:6]
    feats = {}
    for name, root in (("float", bundle), ("int8", int8)):
        b = open_bundle(root)
        feats[name] = Retriever(b, select_backend(b, "onnxruntime")).encode_images(images)
    cos = (feats["float"].blocks["B1"][:, 0] * feats["int8"].blocks["B1"][:, 0]).sum(-1)
    assert cos.min() > 0.9, cos

    res = CliRunner().invoke(main, ["export", str(int8), "--int8"])
    assert res.exit_code != 0 and "already quantized" in res.output

    out = tmp_path / "parity.json"
    res = CliRunner().invoke(main, ["parity", str(trained / "run" / "best.pt"), str(int8), "--split", "test",
                                    "--backend", "onnxruntime", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["precision"] == "int8 detector+image_encoder, float32 others" and report["tolerance"] == 0.02
    assert "category i2t r@1" in res.output and "instance rsum" in res.output  # every MAP and R@K change
    # the verdict is the tolerance applied to the measured change, and the exit code follows it
    assert report["passed"] == (abs(report["map_diff"]) <= 0.02)
    assert res.exit_code == (0 if report["passed"] else 1)
    # the verdict is the last line printed (a stray carriage return a progress bar of another
    # thread may leave on the shared stream is not a line)
    printed = [line for line in res.output.splitlines() if line.strip()]
    assert ("PASS" if report["passed"] else "FAIL") in printed[-1], printed[-3:]
    # the INT8 ranking stays close to float32's: most of each query's top 10 is the same
    assert report["top10_agreement_t2i"] > 0.5 and report["top10_agreement_i2t"] > 0.5, report
