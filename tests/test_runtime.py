"""Export, the torch-free runtime, bad input, resumable indexing and parity, on the tiny trained model."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import assert_encoder_cut_to_used_boxes_is_exact
from fbnet.cli import main as fbnet_main


def serve(*args, block_torch=True):
    """Run fbnet-serve-cli in a fresh interpreter in which `import torch` fails."""
    code = textwrap.dedent(f"""
        import sys
        if {block_torch}:
            sys.modules["torch"] = None  # any import of torch now raises ImportError
        from fbnet.runtime.cli import main
        code = main({list(map(str, args))!r})
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        sys.exit(code)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_serve_cli_lists_its_commands_and_query_is_the_default(tmp_path):
    res = serve("--help")
    assert res.returncode == 0, res.stderr
    commands = res.stdout.split("Commands:", 1)[1].split()
    assert all(c in commands for c in ("query", "index", "serve", "triton", "triton-env"))
    for args in (["query", "--help"], ["--text", "a dog", "--help"]):  # the shortcut is query
        res = serve(*args)
        assert res.returncode == 0 and "Usage: fbnet-serve-cli query [OPTIONS] [IMAGES]..." in res.stdout
    for args in (["--text", "a dog"], [tmp_path / "q.jpg"]):  # a first argument that is no command runs query
        res = serve(*args, "--bundle", tmp_path / "nowhere", "--gallery", tmp_path)
        assert res.returncode == 1
        assert res.stderr.strip() == f"Error: {tmp_path / 'nowhere'}: bundle directory not found"
    assert serve("serve", "--help").stdout.count("--max-header-bytes") == 1


def test_bundle_files_manifest_and_checker(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("detector.onnx", "image_encoder.onnx", "text_encoder.onnx", "scorer.onnx", "reranker.onnx", "vocab.json"):
        assert (bundle / name).is_file() and len(manifest["files"][name]) == 64
        if name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(str(bundle / name)), full_check=True)
    assert manifest["kind"] == "fbnet-bundle" and manifest["format_version"] == 1
    assert set(manifest["fusion"]) == {"alpha", "beta", "lam", "mu"}  # mu: the pooled global branch's weight
    text = manifest["graphs"]["text_encoder"]
    assert [i["name"] for i in text["inputs"]] == ["ids", "lengths"]
    assert text["inputs"][0]["shape"] == ["captions", "words"]
    assert manifest["graphs"]["detector"]["inputs"][0]["shape"] == [1, 3, 128, 128]  # static for the detector
    assert all(c["max_rel"] <= 1e-4 for c in manifest["export_check"].values())
    assert "not built" in manifest["engines"]["status"]
    assert manifest["validation_metrics"] and "torch" in manifest["versions"]
    ops = {n.op_type for n in onnx.load(str(bundle / "text_encoder.onnx")).graph.node}
    assert "GRU" in ops and "Loop" not in ops


def test_scorer_box_axis_is_dynamic_and_grouping_is_exact(bundle):
    """The scorer takes any box count: an image cut to its real boxes scores as with J padded
    slots, and Retriever.score (grouped by box count) equals one padded call per image."""
    import onnxruntime as ort

    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.features import ImageFeatures, TextFeatures
    from fbnet.runtime.engine.retriever import Retriever

    b = open_bundle(bundle)
    r = Retriever(b, OnnxRuntimeBackend(b))
    assert r.dynamic_boxes
    rng = np.random.default_rng(0)
    j, d, n = b.model.max_boxes, b.model.embed_dim, 7
    counts = np.array([1, 3, j, 2, 1, j, 3])
    mask = (np.arange(j)[None] < counts[:, None]).astype(np.float32)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    blocks = {}
    for k in r.keys:
        u2 = int(k[1:]) ** 2
        x = unit(rng.normal(size=(n, (j if k[0] == "F" else 1) * u2, d)))
        if k[0] == "F":
            x *= np.repeat(mask, u2, axis=1)[..., None]
        blocks[k] = x
    images = ImageFeatures(blocks, mask)
    texts = TextFeatures({k: unit(rng.normal(size=(5, int(k[1:]) ** 2, d))) for k in r.keys})
    r.call_cost = 0  # one scorer call per box count
    grouped = r.score(images, texts)
    r.call_cost = 10 ** 9  # every group merged: one call, padded to the largest count
    merged = r.score(images, texts)
    sess = ort.InferenceSession(str(bundle / "scorer.onnx"), providers=["CPUExecutionProvider"])
    feeds = lambda im: {"fg_mask": im.fg_mask, **{f"blocks_{k}": im.blocks[k] for k in r.keys},  # noqa: E731
                        **{f"windows_{k}": texts.windows[k] for k in r.keys}}
    padded = sess.run(None, feeds(images))[0]
    np.testing.assert_allclose(grouped, padded, atol=1e-5)
    np.testing.assert_allclose(merged, padded, atol=1e-5)
    cut = sess.run(None, feeds(images.take([1]).cut_boxes(3)))[0]  # 3 box slots, not J
    np.testing.assert_allclose(cut[0], padded[1], atol=1e-5)
    assert [c for _, c in images.box_groups()] == [1, 2, 3, j]
    assert [(sorted(rows), c) for rows, c in images.box_groups(1, 10 ** 9)] == [(list(range(n)), j)]
    # a group joins the next while its padded slots (rows x extra boxes x captions) cost <= call_cost:
    # counts 1 (rows 0, 4) -> 2 (row 3) adds 2 slots; 2 -> 3 would add 3; 3 -> j adds 2 (j - 3)
    top = [([1, 6], 3), ([2, 5], j)] if 2 * (j - 3) > 2 else [([1, 2, 5, 6], j)]
    assert [(sorted(rows), c) for rows, c in images.box_groups(1, 2)] == [([0, 3, 4], 2), *top]
    assert len(images.box_groups(5, 2)) == 4  # five captions: every padded slot costs five times


def test_image_encoder_takes_only_the_boxes_a_batch_uses(bundle, gallery_inputs):
    assert_encoder_cut_to_used_boxes_is_exact(bundle, sorted((gallery_inputs / "images").iterdir()))


def test_saved_ort_optimisations_are_used_and_match(bundle):
    import onnxruntime as ort

    from fbnet.runtime.engine.backends import optimized_file

    from fbnet.runtime.engine.manifest import Manifest

    manifest = Manifest.load(bundle / "manifest.json")
    for name, spec in manifest.graphs.items():
        opt = spec.ort_optimized
        assert (bundle / opt.file).is_file() and opt.source == spec.file, name
        assert optimized_file(spec, ort.__version__) == opt.file
        assert optimized_file(spec, "0.0.0") == spec.file  # another ONNX Runtime: the plain graph


def test_engines_only_without_tensorrt_is_a_clear_error(bundle):
    res = CliRunner().invoke(fbnet_main, ["export", str(bundle), "--engines-only"])
    assert res.exit_code == 1 and "tensorrt" in res.output.lower()


def test_runtime_index_and_queries_without_torch(bundle, gallery_inputs, tmp_path):
    gal = tmp_path / "gallery"
    res = serve("index", "--bundle", bundle, "--images", gallery_inputs / "images",
                "--captions", gallery_inputs / "captions.txt", "--out", gal)
    assert res.returncode == 0, res.stderr
    assert "indexed 12 images and 12 captions" in res.stdout
    assert not gal.with_name("gallery.partial").exists()
    image = sorted((gallery_inputs / "images").iterdir())[0]
    res = serve(image, image, "--bundle", bundle, "--gallery", gal, "--top-k", "3", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["backend"] == "onnxruntime" and len(out["results"]) == 2
    assert [h["rank"] for h in out["results"][0]["hits"]] == [1, 2, 3]
    scores = [h["score"] for h in out["results"][0]["hits"]]
    assert scores == sorted(scores, reverse=True)
    res = serve("--text", "a big red circle on grass", "--bundle", bundle, "--gallery", gal, "--top-k", "2")
    assert res.returncode == 0, res.stderr
    assert "text query: a big red circle on grass" in res.stdout and res.stdout.count(".png") == 2


def test_bad_inputs_give_one_clear_error(bundle, gallery_inputs, tmp_path):
    gal = tmp_path / "gallery"
    assert serve("index", "--bundle", bundle, "--captions", gallery_inputs / "captions.txt", "--out", gal,
                 block_torch=False).returncode == 0
    res = serve(tmp_path / "nope.jpg", "--bundle", bundle, "--gallery", gal)
    assert res.returncode == 1 and "nope.jpg: image not found" in res.stderr
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    res = serve(tmp_path / "bad.jpg", "--bundle", bundle, "--gallery", gal)
    assert res.returncode == 1 and "bad.jpg: cannot decode" in res.stderr
    res = serve("--text", "  ", "--bundle", bundle, "--gallery", gal)
    assert res.returncode == 1 and "empty caption" in res.stderr
    (tmp_path / "caps.txt").write_text("a red circle\n\nmore words here\n")
    res = serve("index", "--bundle", bundle, "--captions", tmp_path / "caps.txt", "--out", tmp_path / "g2")
    assert res.returncode == 1 and "caps.txt line 2: empty caption" in res.stderr
    assert not (tmp_path / "g2").exists()
    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    with (altered / "scorer.onnx").open("ab") as fh:
        fh.write(b"\0")
    res = serve("--text", "a red circle", "--bundle", altered, "--gallery", gal)
    assert res.returncode == 1 and "scorer.onnx: altered since export" in res.stderr
    (altered / "scorer.onnx").unlink()
    res = serve("--text", "a red circle", "--bundle", altered, "--gallery", gal)
    assert res.returncode == 1 and "scorer.onnx: missing from the bundle" in res.stderr
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another export"  # the same model exported again: its galleries open
    (other / "manifest.json").write_text(json.dumps(manifest))
    image = sorted((gallery_inputs / "images").iterdir())[0]  # the gallery holds captions only
    res = serve(image, "--bundle", other, "--gallery", gal)
    assert res.returncode == 0, res.stderr
    manifest["fusion"]["alpha"] += 0.25  # another model
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = serve(image, "--bundle", other, "--gallery", gal)
    assert res.returncode == 1 and "gallery.json: made with another model: its fusion differs" in res.stderr
    broken = tmp_path / "broken"
    shutil.copytree(gal, broken)
    (broken / "gallery.json").write_text('{\n "bundle": "x",\n oops\n}')
    res = serve("--text", "a red circle", "--bundle", bundle, "--gallery", broken)
    assert res.returncode == 1 and "gallery.json line 3: invalid JSON" in res.stderr


def test_index_resumes_after_an_interruption(bundle, gallery_inputs, tmp_path):
    from fbnet.runtime.engine.backends import select_backend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images
    from fbnet.runtime.gallery.gallery import Gallery

    b = open_bundle(bundle)
    retriever = Retriever(b, select_backend(b, "onnxruntime"))
    images = list_images(gallery_inputs / "images")
    calls = []
    real = retriever.encode_images

    def flaky(paths):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(paths)

    retriever.encode_images = flaky
    with pytest.raises(KeyboardInterrupt):
        build_gallery(retriever, images, ["a red circle"], tmp_path / "g", part_size=5)
    assert not (tmp_path / "g").exists() and (tmp_path / "g.partial" / "images-00000.npz").is_file()
    build_gallery(retriever, images, ["a red circle"], tmp_path / "g", part_size=5)
    assert calls == [5, 5, 5, 2]  # the first part was not encoded again
    g = Gallery(tmp_path / "g", b)
    full = real(images)
    for k, v in full.blocks.items():
        assert np.allclose(g.image_features.blocks[k], v, atol=1e-6)


def test_parity_passes_on_onnxruntime(trained, bundle, tmp_path):
    res = CliRunner().invoke(fbnet_main, ["parity", str(trained / "run" / "best.pt"), str(bundle),
                                          "--backend", "onnxruntime", "--json", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    result = json.loads((tmp_path / "p.json").read_text())
    assert abs(result["map_diff"]) <= 0.005 and result["top10_agreement_i2t"] > 0.99
    assert result["max_score_diff"] < 1e-3


def test_tensorrt_profiles_cover_the_box_axis():
    """TensorRT needs min/opt/max for every dynamic axis: 1..J boxes, u**2 blocks a box."""
    from fbnet.export.tensorrt import profile_shapes

    assert profile_shapes(["images", "boxes"], 9, 3) == ((1, 1), (8, 3), (64, 9))
    assert profile_shapes(["images", "box_blocks_3", 512], 9, 3) == ((1, 9, 512), (8, 27, 512), (64, 81, 512))
    assert profile_shapes(["images", "region_blocks", 4], 9, 3) == ((1, 28, 4), (8, 56, 4), (64, 140, 4))
    assert profile_shapes([1, 3, 416, 416], 9, 3) is None


def test_a_take_of_rows_is_read_once_and_equals_the_plain_gather(tmp_path):
    from fbnet.runtime.engine.features import ImageFeatures, ImageRows
    from fbnet.runtime.gallery.stores import map_rows

    rng = np.random.default_rng(0)
    blocks = {"B1": rng.random((50, 1, 4), dtype=np.float32), "F1": rng.random((50, 3, 4), dtype=np.float32)}
    for k, v in blocks.items():
        np.save(tmp_path / f"{k}.npy", v)
    mask = (np.arange(3)[None, :] < rng.integers(1, 4, 50)[:, None]).astype(np.float32)
    feats = ImageFeatures({k: map_rows(tmp_path / f"{k}.npy") for k in blocks}, mask)
    rows = feats.take(np.array([40, 3, 17, -1])).take(slice(1, 4))  # composed: items 3, 17, 49
    assert isinstance(rows, ImageRows) and list(rows.index) == [3, 17, 49]
    for k, v in blocks.items():
        assert np.array_equal(rows.blocks[k], v[[3, 17, 49]])
    got = rows.group_feeds(np.array([0, 2]), 2)  # items 3 and 49, cut to 2 box slots
    assert np.array_equal(got["blocks_F1"], blocks["F1"][[3, 49], :2])
    assert np.array_equal(got["fg_mask"], mask[[3, 49], :2])
    assert np.array_equal(feats.take(mask[:, 2] > 0).fg_mask, mask[mask[:, 2] > 0])
