import pytest
import torch

from fbnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fbnet.config import ConfigError, FBNetConfig


def test_round_trip_and_no_temporary_left(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(2)}})
    data = load_checkpoint(path)
    assert torch.equal(data["model"]["w"], torch.ones(2)) and "torch" in data["versions"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_and_foreign_checkpoints_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(1000)}})
    (tmp_path / "t.pt").write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="t.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"kind": "fbnet-checkpoint", "format_version": 99, "versions": {"fbnet": "9.0"}}, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="v.pt: checkpoint format 99"):
        load_checkpoint(tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_config_unknown_key_names_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.epochz'"):
        FBNetConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model:\n  embed_dim: 64\n  backbone: {name: alexnet}\n")
    cfg = FBNetConfig.load(tmp_path / "d.yaml")
    assert cfg.model.embed_dim == 64 and cfg.model.backbone.name == "alexnet"
