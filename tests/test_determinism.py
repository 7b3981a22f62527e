"""Seeded training on CPU is reproducible: two runs give the same losses and the same weights."""

import json

import torch
from click.testing import CliRunner

from fbnet.checkpoint import load_checkpoint
from fbnet.cli import main

CONFIG = """
model:
  embed_dim: 32
  backbone: {name: resnet18, mode: roi, image_size: 64}
  detector: {name: none}
train: {epochs: 2, batch_size: 16, seed: 7}
"""


def test_two_runs_are_identical(tiny_synth, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    runs = []
    for name in ("a", "b"):
        res = CliRunner().invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "cfg.yaml"),
                                        "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        losses = [json.loads(line).get("loss") for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "epoch"]
        runs.append((losses, load_checkpoint(tmp_path / name / "best.pt")["model"]))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 2
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key
