"""The distilled detection head on MobileNetV2's maps (issue 20): its loss fits a teacher's boxes,
a checkpoint exports with it (``fbnet export --detector``) with the runtime's boxes equal to
PyTorch's, and bad detector files are refused with one line naming them. The whole command on
real Flickr8k photos, with YOLOv3-tiny as the teacher, is in ``tests/test_flickr8k.py``."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_encoder_cut_to_used_boxes_is_exact, train_through_cli
from fbnet.cli import main
from fbnet.data.manifest import load_dataset
from fbnet.distill import Targets, agreement, dev_agreement, head_loss, kmeans_anchors, save_distilled
from fbnet.models.mobilenet_head import STAGES, MobileNetHeadDetector
from fbnet.preprocess import load_image


def _targets(student, items, canvas, max_boxes):
    """The dataset's own boxes as the teacher's, score 0.9 each."""
    canvases = torch.from_numpy(np.stack([load_image(it.image, canvas) for it in items]))
    boxes = np.zeros((len(items), max_boxes, 4), np.float32)
    scores = np.zeros((len(items), max_boxes), np.float32)
    for i, it in enumerate(items):
        for j, b in enumerate(it.boxes[:max_boxes]):
            boxes[i, j], scores[i, j] = b[:4], 0.9
    with torch.no_grad():
        maps = [m.numpy().astype(np.float16) for m in student.maps(canvases)]
    return Targets(maps, boxes, scores)


def _fit(student, targets, canvas, steps=150):
    """Anchors by k-means, then full-batch Adam on the distillation loss (what ``distill_detector``
    does by mini-batches)."""
    anchors = kmeans_anchors(targets.boxes[targets.scores > 0], 6)
    student.anchors.copy_(torch.from_numpy(anchors).view_as(student.anchors))
    opt = torch.optim.Adam(student.heads.parameters(), 3e-3)
    for _ in range(steps):
        student.train()
        maps, boxes, scores = targets.batch(np.arange(len(targets.boxes)))
        loss = head_loss(student, student.predict(maps), boxes, scores, canvas)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


def test_heads_learn_a_teachers_boxes(tiny_synth):
    """On 16 synthetic images, the loss takes the heads from boxes that miss the teacher's (F1
    under 0.2) to the teacher's boxes (recall and precision at IoU >= 0.5 both >= 0.9)."""
    torch.manual_seed(0)
    items = load_dataset(tiny_synth).split("train")[:16]
    student = MobileNetHeadDetector(max_boxes=4, score_threshold=0.1)
    targets = _targets(student, items, 128, 4)
    anchors = kmeans_anchors(targets.boxes[targets.scores > 0], 6)
    assert anchors.shape == (6, 2) and (np.diff(anchors.prod(axis=1)) >= 0).all()  # sorted by area
    before = dev_agreement(student, targets, 128)
    assert before["f1"] < 0.2, before
    frozen = {k: v.clone() for k, v in student.stages.state_dict().items()}
    _fit(student, targets, 128)
    after = dev_agreement(student, targets, 128)
    assert after["recall"] >= 0.9 and after["precision"] >= 0.9, after
    # MobileNetV2's layers (batch-norm statistics included) never move
    assert all(torch.equal(v, frozen[k]) for k, v in student.stages.state_dict().items())


def test_agreement_counts_overlaps_at_iou_half():
    ref = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)]
    near = [np.array([[1, 1, 11, 11]], np.float32)]  # IoU 81/119 with the first, none with the second
    assert agreement(ref, near) == 0.5 and agreement(near, ref) == 1.0
    assert agreement(ref, [np.zeros((0, 4), np.float32)]) == 0.0


MOBILENET_CONFIG = """
model:
  embed_dim: 32
  word_dim: 16
  backbone: {{name: mobilenet_v2, weights: {weights}, mode: roi, image_size: 64}}
  detector: {{name: none, max_boxes: 2}}
train: {{epochs: 1, batch_size: 16, fusion_grid: [1.0], global_grid: [1.0]}}
"""


def calibrated_mobilenet(path):
    """Randomly initialised MobileNetV2 weights whose batch-norm statistics are measured on noise
    images (with the initial ones, activations fade to about 1e-6 by the 160-channel stage, and the
    head has nothing to read): a stand-in for the ImageNet weights of ../shared."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(16, 3, 64, 64))
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory):
    """A tiny run on MobileNetV2 blocks (the backbone the head shares; random weights with measured
    batch-norm statistics) and no detector."""
    root = tmp_path_factory.mktemp("mnv2")
    weights = calibrated_mobilenet(root / "mobilenet_v2.pth")
    return train_through_cli(root, MOBILENET_CONFIG.format(weights=weights), "--sizes", "12,4,4", "--seed", "1",
                             "--image-size", "64")


def _distil(run, path, share_layers: bool):
    """A head detector for the run's 64 px canvas and J = 2, fitted to the run's training boxes and
    written as ``fbnet distill-detector`` writes one; with ``share_layers`` its MobileNetV2 layers
    are the run's own (as distilling from the checkpoint's backbone weights makes them), so that its
    detector graph can pass its map to the image encoder."""
    from fbnet.checkpoint import load_checkpoint
    from fbnet.evaluate import load_model
    from fbnet.pipeline import frozen_from_checkpoint

    ckpt = load_checkpoint(run / "run" / "best.pt")
    torch.manual_seed(1)
    student = MobileNetHeadDetector(max_boxes=2, score_threshold=0.1).eval()
    encoder = frozen_from_checkpoint(load_model(ckpt)[0], ckpt)[1]
    for stage, (a, b) in zip(student.stages, STAGES):
        # the run's own layers, or the same with other batch-norm shifts: weights that differ
        stage.load_state_dict(encoder.trunk[a:b].state_dict())
        if not share_layers:
            for m in stage.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.bias.data += 0.01
    targets = _targets(student, load_dataset(ckpt["data_root"]).split("train"), 64, 2)
    save_distilled(path, _fit(student, targets, 64), 64, {"test": True})
    return path


@pytest.fixture(scope="module")
def distilled(mobilenet_run, tmp_path_factory):
    return _distil(mobilenet_run, tmp_path_factory.mktemp("distilled") / "head.pt", share_layers=False)


@pytest.fixture(scope="module")
def distilled_sharing(mobilenet_run, tmp_path_factory):
    return _distil(mobilenet_run, tmp_path_factory.mktemp("distilled") / "head-sharing.pt", share_layers=True)


@pytest.mark.parametrize("sharing", [False, True])
def test_export_serves_the_distilled_detector(mobilenet_run, distilled, distilled_sharing, sharing, tmp_path):
    """The bundle's boxes and scores are PyTorch's head's, and parity with PyTorch (which runs the
    whole backbone on the image) passes, whether or not the image encoder starts from the
    detector's map; it does exactly when their MobileNetV2 layers are the same."""
    from fbnet.checkpoint import load_checkpoint, with_detector_file
    from fbnet.evaluate import load_model
    from fbnet.export.graphs import DetectorGraph
    from fbnet.pipeline import frozen_from_checkpoint
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever

    head = distilled_sharing if sharing else distilled
    ckpt_path = mobilenet_run / "run" / "best.pt"
    res = CliRunner().invoke(main, ["export", str(ckpt_path), "--out", str(tmp_path / "b"), "--detector", str(head)])
    assert res.exit_code == 0, res.output
    assert ("starts from the detector's map" in res.output) == sharing
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    record = manifest["source_checkpoint"]
    assert record["detector_file"] == str(head.resolve()) and len(record["detector_file_sha256"]) == 64
    ckpt = with_detector_file(load_checkpoint(ckpt_path), head)
    assert ckpt["config"]["model"]["detector"]["name"] == "mobilenet_v2_head"
    torch_detector = DetectorGraph(frozen_from_checkpoint(load_model(ckpt)[0], ckpt)[0]).eval()
    bundle = open_bundle(tmp_path / "b")
    retriever = Retriever(bundle, OnnxRuntimeBackend(bundle))
    assert retriever.shares_lower == sharing
    # the photos the head was fitted to: it finds boxes there
    photos = [it.image for it in load_dataset(load_checkpoint(ckpt_path)["data_root"]).split("train")[:8]]
    found = 0
    for photo in photos:
        canvas = load_image(photo, 64)
        boxes, scores = retriever.detect(canvas)
        with torch.no_grad():
            want_boxes, want_scores = torch_detector(torch.from_numpy(canvas[None]))
        np.testing.assert_allclose(boxes, want_boxes[0].numpy(), atol=1e-3)
        np.testing.assert_allclose(scores, want_scores[0].numpy(), atol=1e-5)
        found += int((scores > 0).sum())
    assert found > 0  # the comparison saw real boxes, not only padding
    # parity runs PyTorch with the detector the bundle serves, and passes
    res = CliRunner().invoke(main, ["parity", str(ckpt_path), str(tmp_path / "b"), "--backend", "onnxruntime"])
    assert res.exit_code == 0 and "PASS" in res.output, res.output
    assert_encoder_cut_to_used_boxes_is_exact(tmp_path / "b", photos)


def test_bad_detector_files_get_one_line(mobilenet_run, tiny_run, distilled, tmp_path):
    runner = CliRunner()
    not_ours = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, not_ours)
    wrong_j = tmp_path / "j9.pt"
    save_distilled(wrong_j, MobileNetHeadDetector(max_boxes=9), 64, {})
    wrong_canvas = tmp_path / "c224.pt"
    save_distilled(wrong_canvas, MobileNetHeadDetector(max_boxes=2), 224, {})
    cases = [(tmp_path / "missing.pt", "distilled detector not found"),
             (not_ours, "not a distilled detector"),
             (wrong_j, "keeps 9 boxes per image"),
             (wrong_canvas, "distilled on a 224 px canvas")]
    for path, message in cases:
        res = runner.invoke(main, ["export", str(mobilenet_run / "run" / "best.pt"), "--out", str(tmp_path / "x"),
                                   "--detector", str(path)])
        assert res.exit_code != 0 and message in res.output and str(path) in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "x").exists()
    res = runner.invoke(main, ["export", str(tiny_run / "run" / "best.pt"), "--out", str(tmp_path / "x"),
                               "--detector", str(distilled)])  # its blocks come from its detector's trunk
    assert res.exit_code != 0 and "cannot replace" in res.output and str(distilled) in res.output, res.output
    res = runner.invoke(main, ["export", str(mobilenet_run / "run" / "best.pt"), "--out", str(tmp_path / "x"),
                               "--detector", str(distilled), "--detector-size", "160"])
    assert res.exit_code != 0 and "not both" in res.output


@pytest.mark.parametrize("model, message", [
    ("backbone: {name: mobilenet_v2}\n  detector: {name: none}", "needs a teacher detector"),
    ("backbone: {name: resnet18}\n  detector: {name: fasterrcnn_light}", "the head runs on MobileNetV2"),
])
def test_distill_refuses_configs_without_a_teacher_or_mobilenet(tiny_synth, tmp_path, model, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  {model}\n")
    res = CliRunner().invoke(main, ["distill-detector", "--data", str(tiny_synth), "--config", str(cfg),
                                    "--out", str(tmp_path / "head.pt")])
    assert res.exit_code != 0 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "head.pt").exists()
