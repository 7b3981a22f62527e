"""The whole chain on a slice of real Flickr8k, with the pretrained weights in ../shared:
MobileNetV2 block features (RoIAlign), YOLOv3-tiny boxes, word2vec embeddings, a short training,
instance-level evaluation on dev, then export and parity. Skips cleanly without ../shared."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED, assert_encoder_cut_to_used_boxes_is_exact, cli_ok
from fbnet.checkpoint import load_checkpoint, with_detector_file, with_detector_size
from fbnet.cli import main
from fbnet.evaluate import load_model
from fbnet.export.graphs import DetectorGraph
from fbnet.pipeline import frozen_from_checkpoint
from fbnet.preprocess import load_image

FLICKR = SHARED / "data" / "flickr8k"
WEIGHTS = SHARED / "weights"
pytestmark = pytest.mark.skipif(
    not (FLICKR / "captions.txt").is_file() or not (WEIGHTS / "mobilenet_v2-imagenet-features.pth").is_file(),
    reason="needs ../shared/data/flickr8k and ../shared/weights (not shipped to users)")


@pytest.fixture(scope="module")
def flickr_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr8k")
    src = root / "src"
    src.mkdir()
    train = FLICKR.joinpath("train.txt").read_text().split()[:200]
    dev = FLICKR.joinpath("dev.txt").read_text().split()[:100]
    keep = set(train) | set(dev)
    lines = [ln for ln in FLICKR.joinpath("captions.txt").read_text().splitlines() if ln.split("#")[0] in keep]
    (src / "captions.txt").write_text("\n".join(lines) + "\n")
    (src / "train.txt").write_text("\n".join(train) + "\n")
    (src / "dev.txt").write_text("\n".join(dev) + "\n")
    (root / "cfg.yaml").write_text(f"""
data: {{word_vectors: {WEIGHTS / 'word2vec-googlenews-300-subset.bin'}}}
model:
  embed_dim: 256
  backbone: {{name: mobilenet_v2, weights: {WEIGHTS / 'mobilenet_v2-imagenet-features.pth'}, mode: roi, image_size: 224}}
  detector: {{name: yolov3_tiny, weights: {WEIGHTS / 'yolov3-tiny-coco'}, max_boxes: 9, score_threshold: 0.1}}
train: {{epochs: 3, batch_size: 64, lr: 0.0005}}
""")
    runner = CliRunner()
    res = runner.invoke(main, ["data", "convert", "flickr", str(src / "captions.txt"), "--images",
                               str(FLICKR / "images"), "--out", str(root / "data")])
    assert res.exit_code == 0, res.output
    assert "'train': 200, 'val': 100, 'test': 0" in res.output
    res = runner.invoke(main, ["train", "--data", str(root / "data"), "--config", str(root / "cfg.yaml"),
                               "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    return root, res.output


def test_train_and_evaluate_on_real_images(flickr_run):
    root, output = flickr_run
    assert "word vectors:" in output and "initialised from" in output  # coverage is printed
    assert "no test split: reporting the validation split" in output
    metrics = json.loads((root / "run" / "metrics-val.json").read_text())
    assert metrics["primary"] == "instance" and "category" not in metrics
    # chance R@sum for 100 images x 500 captions is about 32; training must be well above it
    assert metrics["instance"]["rsum"] > 64, metrics["instance"]["rsum"]
    boxes = __import__("numpy").load(root / "run" / "features" / "val" / "mask.npy")
    assert boxes.sum(axis=1).mean() > 1  # YOLOv3-tiny finds real foreground boxes


def test_export_and_parity_on_real_images(flickr_run):
    root, _ = flickr_run
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(root / "run" / "best.pt"), "--out", str(root / "bundle")])
    assert res.exit_code == 0, res.output
    assert (root / "bundle" / "detector.onnx").is_file()
    res = runner.invoke(main, ["parity", str(root / "run" / "best.pt"), str(root / "bundle"), "--split", "val",
                               "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output


def test_a_smaller_detector_exports_and_keeps_parity(flickr_run):
    """``--detector-size 160`` serves YOLOv3-tiny at 160 x 160 from weights trained at 416: the
    manifest records the size, the bundle's boxes are PyTorch's YOLO at 160 (and not the 416
    bundle's), parity runs PyTorch with the same detector (and passes), and the image encoder fed
    only the used box slots stays exact on real YOLO boxes."""
    root, _ = flickr_run
    out = root / "bundle-160"
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(root / "run" / "best.pt"), "--out", str(out), "--detector-size", "160"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["source_checkpoint"]["detector_size"] == 160
    dev = [FLICKR / "images" / name for name in FLICKR.joinpath("dev.txt").read_text().split()[:8]]
    small = _serves_pytorchs_boxes(out, with_detector_size(load_checkpoint(root / "run" / "best.pt"), 160), dev)
    full = _detections(root / "bundle", dev)  # the 416 bundle of the test above
    assert any(a[0].shape != b[0].shape or not np.allclose(a[0], b[0]) for a, b in zip(small, full))
    _parity_passes(root / "run" / "best.pt", out)
    assert_encoder_cut_to_used_boxes_is_exact(out, dev)


def test_a_distilled_detector_exports_and_keeps_parity(flickr_run):
    """``fbnet distill-detector`` trains the head on MobileNetV2's maps on YOLOv3-tiny's boxes of the
    slice's 200 training photos (selected on its 100 dev photos); ``fbnet export --detector``
    serves it: the manifest records the file, the bundle's boxes are PyTorch's head's, parity
    passes, and the image encoder cut to the used box slots stays exact."""
    root, _ = flickr_run
    head, out = root / "head.pt", root / "bundle-head"
    runner = CliRunner()
    res = runner.invoke(main, ["distill-detector", "--data", str(root / "data"), "--config", str(root / "cfg.yaml"),
                               "--out", str(head), "--epochs", "25"])
    assert res.exit_code == 0, res.output
    assert "epoch 25:" in res.output and "(best)" in res.output and f"--detector {head}" in res.output
    info = json.loads((root / "head.json").read_text())
    assert info["teacher"]["name"] == "yolov3_tiny" and info["train_images"] == 200 and info["dev_images"] == 100
    # 100 steps on 200 photos teach little (BENCHMARKS.md has the full split's agreement), but the
    # loss must fall: epoch 1's is the untrained heads'
    # (a progress bar's clearing may precede an epoch's line on the same row)
    losses = [float(loss) for loss in re.findall(r"epoch \d+: loss ([\d.]+)", res.output)]
    assert len(losses) == 25 and losses[-1] < losses[0] / 2, losses
    res = runner.invoke(main, ["export", str(root / "run" / "best.pt"), "--out", str(out), "--detector", str(head)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["source_checkpoint"]["detector_file"] == str(head.resolve())
    dev = [FLICKR / "images" / name for name in FLICKR.joinpath("dev.txt").read_text().split()[:8]]
    _serves_pytorchs_boxes(out, with_detector_file(load_checkpoint(root / "run" / "best.pt"), head), dev)
    _parity_passes(root / "run" / "best.pt", out)
    assert_encoder_cut_to_used_boxes_is_exact(out, dev)


def test_an_ensemble_shares_mobilenets_frozen_modules(flickr_run):
    """A second member that fine-tunes MobileNetV2's top at output stride 16 beside the fixture's
    frozen one: the exported ensemble runs the first 19 modules once (the frozen member's whole
    trunk, the second member's first 14, before its dilated stage), the runtime's shared path
    gives each member's own features, parity passes through it, and an altered trunk graph is
    refused naming its file."""
    from fbnet.runtime.engine.ensemble import EnsembleRetriever, open_ensemble_bundle, open_retriever
    from fbnet.runtime.engine.manifest import BundleError

    root, _ = flickr_run
    (root / "cfg-os16.yaml").write_text((root / "cfg.yaml").read_text().replace(
        "mode: roi,", "mode: roi, trainable_blocks: 2, output_stride: 16,").replace("epochs: 3,", "epochs: 1,"))
    cli_ok("train", "--data", root / "data", "--config", root / "cfg-os16.yaml", "--out", root / "run-os16")
    (root / "ens.yaml").write_text("kind: fbnet-ensemble\nmembers:\n  - {checkpoint: run/best.pt, weight: 1}\n"
                                   "  - {checkpoint: run-os16/best.pt, weight: 0.5}\n")
    out = cli_ok("export", root / "ens.yaml", "--out", root / "ens-bundle")
    assert "shared trunk: member 0's first 19 modules" in out and "member 1 from module 14" in out
    record = json.loads((root / "ens-bundle" / "ensemble.json").read_text())["trunk"]
    assert record["modules"] == {"member0": 19, "member1": 14} and record["reference"] == "member0"
    assert "shared trunk: member0's CNN once per photo; modules shared: member0 19, member1 14" in \
        cli_ok("info", root / "ens-bundle")

    retriever = open_retriever(root / "ens-bundle", "onnxruntime")
    assert retriever.trunk_inputs == {0: "lower_19", 1: "lower_14"}
    own = EnsembleRetriever(retriever.bundle, retriever.members, share_trunk=False)
    dev = [FLICKR / "images" / name for name in FLICKR.joinpath("dev.txt").read_text().split()[:6]]
    shared_features, own_features = retriever.encode_images(dev), own.encode_images(dev)
    for a, b in zip(shared_features.members, own_features.members):
        for key in a.blocks:
            np.testing.assert_allclose(a.blocks[key], b.blocks[key], atol=1e-5)
    texts = retriever.encode_texts(["a dog runs on the grass", "two children play in the water"])
    np.testing.assert_allclose(retriever.score(shared_features, texts), own.score(own_features, texts), atol=1e-5)
    _parity_passes(root / "ens.yaml", root / "ens-bundle")

    with (root / "ens-bundle" / "trunk.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="trunk.onnx: altered since export"):
        open_ensemble_bundle(root / "ens-bundle")


def _serves_pytorchs_boxes(bundle, ckpt, photos):
    """The bundle's detector gives the boxes and scores of ``ckpt``'s PyTorch detector on ``photos``
    (returned, per photo)."""
    found = _detections(bundle, photos)
    detector = DetectorGraph(frozen_from_checkpoint(load_model(ckpt)[0], ckpt)[0]).eval()
    for (boxes, scores), photo in zip(found, photos):
        with torch.no_grad():
            want = detector(torch.from_numpy(load_image(photo, 224)[None]))
        np.testing.assert_allclose(boxes, want[0][0].numpy(), atol=1e-2)
        np.testing.assert_allclose(scores, want[1][0].numpy(), atol=1e-4)
    assert sum(int((s > 0).sum()) for _, s in found) > 0  # real boxes were compared, not only padding
    return found


def _parity_passes(checkpoint, bundle):
    res = CliRunner().invoke(main, ["parity", str(checkpoint), str(bundle), "--split", "val",
                                    "--backend", "onnxruntime"])
    assert res.exit_code == 0 and "PASS" in res.output, res.output


def _detections(bundle, photos):
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever

    b = open_bundle(bundle)
    r = Retriever(b, OnnxRuntimeBackend(b))
    return [r.detect(load_image(p, b.canvas)) for p in photos]
