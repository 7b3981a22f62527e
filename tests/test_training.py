"""Early stopping, and a resumed run that keeps counting towards it."""

import json

from click.testing import CliRunner

from fbnet.checkpoint import load_checkpoint
from fbnet.cli import main
from fbnet.train import epochs_since_best

# lr 0: validation MAP never improves after the first epoch, so patience 2 stops after epoch 3;
# epoch 2's plateau decays the learning rate and epoch 3 trains after it (a run of the plateau path)
CONFIG = """
model:
  embed_dim: 32
  backbone: {name: resnet18, mode: roi, image_size: 64}
  detector: {name: none}
train: {epochs: 6, patience: 2, plateau_decay: 0.5, lr: 0.0, batch_size: 16, seed: 3}
"""


def test_epochs_since_best():
    assert epochs_since_best([]) == 0
    assert epochs_since_best([{"val_map": 0.2}, {"val_map": 0.5}, {"val_map": 0.4}, {"val_map": 0.5}]) == 2
    assert epochs_since_best([{"val_map": 0.2}, {"val_map": 0.3}]) == 0


def test_early_stopping_and_resume(tiny_synth, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--data", str(tiny_synth), "--config", str(tmp_path / "cfg.yaml"),
                               "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "epoch 3:" in res.output and "epoch 4:" not in res.output and "early stop" in res.output
    assert "learning rate x 0.5" in res.output
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 3 and "early_stop" in events and "fusion" in events
    # a resumed run with a larger budget counts the epochs it has: it stops at once
    res = runner.invoke(main, ["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "9"])
    assert res.exit_code == 0, res.output
    assert "early stop" in res.output and "epoch 4:" not in res.output
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3


def test_precision_auto_follows_the_hardware():
    """``auto`` is bfloat16 exactly where oneDNN runs it natively; an explicit bfloat16 on a CPU
    without it still runs (emulated) but says so, since it is about 10x slower there."""
    import warnings

    import pytest
    import torch

    from fbnet.config import FBNetConfig
    from fbnet.train import uses_bfloat16

    cpu = torch.device("cpu")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert FBNetConfig.from_dict({"train": {"precision": "auto"}}).train.precision == "auto"
    assert uses_bfloat16("auto", cpu) is native and uses_bfloat16("float32", cpu) is False
    uses_bfloat16.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert uses_bfloat16("bfloat16", cpu) is True
    assert any("emulated" in str(w.message) for w in caught) is not native
    with pytest.raises(Exception, match="precision"):
        FBNetConfig.from_dict({"train": {"precision": "float16"}})
