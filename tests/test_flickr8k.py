"""The whole chain on a slice of real Flickr8k, with the pretrained weights in ../shared:
MobileNetV2 block features (RoIAlign), YOLOv3-tiny boxes, word2vec embeddings, a short training,
instance-level evaluation on dev, then export and parity. Skips cleanly without ../shared."""

import json

import pytest
from click.testing import CliRunner

from conftest import SHARED
from fbnet.cli import main

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
