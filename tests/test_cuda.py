"""Training on a GPU (``train.device``): skipped where torch sees no CUDA device (CI has none)."""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fbnet.checkpoint import load_checkpoint
from fbnet.cli import main
from fbnet.evaluate import evaluate
from fbnet.models.attention import grouped_cross_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")

CONFIG = """
model:
  embed_dim: 32
  backbone: {name: resnet18, mode: roi, image_size: 64}
  detector: {name: none}
train: {epochs: 2, batch_size: 16, seed: 7, device: cuda}
"""


def test_grouped_scoring_on_cuda_matches_cpu():
    torch.manual_seed(0)
    counts = torch.tensor([9, 2, 5, 2, 9, 1])
    mask = (torch.arange(9)[None, :] < counts[:, None]).float()
    blocks = F.normalize(torch.randn(6, 9, 32), dim=-1) * mask.unsqueeze(-1)
    windows = F.normalize(torch.randn(5, 4, 32), dim=-1)
    cpu = grouped_cross_attention(blocks, mask, windows, 4.0, 9.0)
    gpu = grouped_cross_attention(blocks.cuda(), mask.cuda(), windows.cuda(), 4.0, 9.0)
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_training_runs_on_cuda_and_resumes(tiny_synth, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "cfg.yaml"),
                               "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["config"]["train"]["device"] == "cuda"
    # it learned: validation MAP well above chance, and the CUDA-trained weights score the same on
    # the CPU (evaluate) as training recorded on the GPU
    report = evaluate(tmp_path / "run" / "best.pt", "val", out=tmp_path / "eval")
    assert report[report["primary"]]["map"] > report["chance_map"] + 0.05, report
    recorded = ckpt["val_metrics"][report["primary"]]["map"]
    assert abs(report[report["primary"]]["map"] - recorded) < 2e-3, (report, recorded)
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3
