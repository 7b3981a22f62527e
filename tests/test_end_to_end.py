"""Train on a tiny synthetic set through the CLI; the trained model must clearly beat the untrained one."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from fbnet.checkpoint import load_checkpoint
from fbnet.cli import main
from fbnet.data.manifest import load_dataset
from fbnet.evaluate import load_model
from fbnet.metrics import retrieval_report
from fbnet.models.fbnet import FBNet
from fbnet.pipeline import Captions, build_frozen, feature_cache, score_split, split_features


def _test_map(ckpt, model, run=None):
    """Test-split category MAP of ``model`` on the features of the checkpoint's run (``run``:
    its directory; default the FB-Net fixture's)."""
    from pathlib import Path

    cfg, _, vocab, fusion = load_model(ckpt)
    ds = load_dataset(ckpt["data_root"])
    items = ds.split("test")
    det, enc = build_frozen(cfg, 10, ckpt["detector"], ckpt["encoder"])
    cache = feature_cache(cfg, run or Path(ckpt["data_root"]).parent / "run")
    feats = split_features(cfg, items, det, enc, cache, "test")
    caps = Captions.from_items(items, vocab, cfg.data.max_words, True)
    rep = retrieval_report(model.fuse(score_split(model, feats, caps), fusion), caps.image, caps.image_labels,
                           caps.labels)
    return rep["category"]["map"]


def test_training_beats_the_untrained_model(trained):
    ckpt = load_checkpoint(trained / "run" / "best.pt")
    cfg, model, vocab, _ = load_model(ckpt)
    torch.manual_seed(0)
    untrained = FBNet(cfg.model, len(vocab), ckpt["feature_dim"]).eval()
    trained_map, untrained_map = _test_map(ckpt, model), _test_map(ckpt, untrained)
    assert trained_map > untrained_map + 0.05, (trained_map, untrained_map)


def test_run_outputs_and_checkpoint_contents(trained):
    run = trained / "run"
    for name in ("best.pt", "last.pt", "detector.pt", "log.jsonl", "metrics-test.json", "pr-test.png"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(run / "best.pt")
    assert {"model", "config", "vocab", "fusion", "val_metrics", "versions", "encoder", "detector"} <= set(ckpt)
    assert set(ckpt["fusion"]) == {"alpha", "beta", "lam", "mu"}
    metrics = json.loads((run / "metrics-test.json").read_text())
    assert metrics["category"]["map"] > metrics["chance_map"]
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 6 and "fusion" in events


def test_resume_continues_an_interrupted_run(trained):
    runner = CliRunner()
    args = ["train", "--data", str(trained / "data"), "--out", str(trained / "run")]
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "--resume" in res.output
    res = runner.invoke(main, ["train", "--out", str(trained / "run"), "--resume", "--epochs", "7"])  # no --data
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "epoch 7:" in res.output and "epoch 6:" not in res.output
    assert load_checkpoint(trained / "run" / "last.pt")["epoch"] == 7


def test_evaluate_command_and_bad_checkpoint(trained, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(trained / "run" / "best.pt"), "--split", "val", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "R@sum" in res.output and (tmp_path / "metrics-val.json").is_file() and (tmp_path / "pr-val.png").is_file()
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    res = runner.invoke(main, ["evaluate", str(tmp_path / "broken.pt")])
    assert res.exit_code == 1 and "broken.pt: not a readable checkpoint" in res.output


def test_features_are_deterministic(trained, tmp_path):
    ckpt = load_checkpoint(trained / "run" / "best.pt")
    cfg, _, _, _ = load_model(ckpt)
    items = load_dataset(trained / "data").split("val")[:6]
    det, enc = build_frozen(cfg, 10, ckpt["detector"], ckpt["encoder"])
    a = split_features(cfg, items, det, enc, tmp_path / "a", "val")
    b = split_features(cfg, items, det, enc, tmp_path / "b", "val")
    assert np.array_equal(a.background, b.background) and np.array_equal(a.fg_mask, b.fg_mask)
