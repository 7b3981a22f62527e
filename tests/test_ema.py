"""The moving average of the weights (:mod:`fbnet.ema`, ``train.ema_decay``): its update against a
hand computation, the swap in and out, and a training run that keeps the average in ``best.pt`` and
resumes it exactly."""

import json

import pytest
import torch
from click.testing import CliRunner

from fbnet.checkpoint import load_checkpoint
from fbnet.cli import main
from fbnet.ema import WeightAverage


def test_the_average_follows_the_hand_computation_and_swaps_in_and_out():
    lin, bn = torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    avg = WeightAverage({"lin": lin, "bn": bn}, decay=0.9)
    expected = torch.tensor([[1.0, 2.0]])
    for step, new in enumerate(([[3.0, 2.0]], [[5.0, 0.0]], [[0.0, 1.0]]), start=1):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(new))
        avg.update()
        d = min(0.9, (1 + step) / (10 + step))  # the bias-corrected warm-up's decay
        expected = d * expected + (1 - d) * torch.tensor(new)
    assert torch.allclose(avg.average["lin"]["weight"], expected)
    assert "num_batches_tracked" not in avg.average["bn"]  # integer buffers are not averaged
    with avg.applied():
        assert torch.allclose(lin.weight, expected)
    assert torch.equal(lin.weight, torch.tensor([[0.0, 1.0]]))  # the trained weights are back
    again = WeightAverage({"lin": lin, "bn": bn}, decay=0.9)
    again.load_state_dict(avg.state_dict())
    assert again.steps == 3 and torch.equal(again.average["lin"]["weight"], avg.average["lin"]["weight"])
    with pytest.raises(ValueError, match="decay"):
        WeightAverage({"lin": lin}, decay=1.0)


def test_a_run_keeps_the_average_in_best_pt_and_resumes_it_exactly(tiny_synth, tmp_path):
    """``best.pt`` holds the averaged weights (``last.pt`` the trained ones and the average), every
    epoch logs both weights' validation, and one epoch then ``--resume`` equals two epochs at once."""
    runner = CliRunner()
    (tmp_path / "c.yaml").write_text(
        "model: {embed_dim: 32, backbone: {name: resnet18, image_size: 64}, detector: {name: none}}\n"
        "train: {epochs: 2, batch_size: 16, lr: 0.001, ema_decay: 0.5, fusion_grid: [1.0], global_grid: [1.0]}\n")

    def train(out, *extra):
        res = runner.invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "c.yaml"),
                                   "--out", str(tmp_path / out), *extra])
        assert res.exit_code == 0, res.output

    train("whole")
    train("split", "--epochs", "1")
    first, best = (load_checkpoint(tmp_path / "split" / f) for f in ("last.pt", "best.pt"))
    average = first["ema"]["average"]["model"]  # the first epoch is always the best so far
    assert all(torch.equal(best["model"][k], v) for k, v in average.items())
    assert any(not torch.equal(first["model"][k], v) for k, v in average.items())
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "split"), "--resume", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    epochs = [e for e in map(json.loads, (tmp_path / "whole" / "log.jsonl").read_text().splitlines())
              if e["event"] == "epoch"]
    assert len(epochs) == 2 and all({"trained_val_map", "trained_val_rsum"} <= e.keys() for e in epochs)
    whole, split = (load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "split"))
    assert whole["ema"]["steps"] == split["ema"]["steps"] > 0
    for key, value in whole["ema"]["average"]["model"].items():
        assert torch.equal(value, split["ema"]["average"]["model"][key]), key
