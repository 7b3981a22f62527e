"""Training on torchrun: two gloo processes on the CPU against one process with the same global
batch. The processes are started by ``torchrun`` itself (``python -m torch.distributed.run``) on
loopback, as a user starts them, and stopped by a timeout if they hang."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import cli_ok, free_ports

CONFIG = """
model:
  embed_dim: 32
  word_dim: 16
  backbone: {name: detector, mode: roi, image_size: 64}
  detector: {name: fasterrcnn_light, epochs: 1, batch_size: 4, max_boxes: 2}
train: {epochs: 2, batch_size: 16, lr: 0.002, fusion_grid: [1.0], global_grid: [1.0]}
"""


def _torchrun(nproc: int, *args, timeout: float = 300) -> str:
    """``fbnet ARGS`` in ``nproc`` processes under torchrun, or in one plain process (``nproc=0``).
    Every process runs one torch thread, so the single process's arithmetic (the detector's
    fine-tuning above all) is what each rank's is, whatever threads this test process has."""
    launch = ([] if not nproc else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                    "--master_addr", "127.0.0.1", "--master_port", str(free_ports(1)[0])])
    cmd = [sys.executable, *launch, "-m", "fbnet", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _epochs(run) -> list[dict]:
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "epoch"]


def _assert_same_training(single, ddp):
    a, b = _epochs(single), _epochs(ddp)
    assert [e["epoch"] for e in a] == [e["epoch"] for e in b]
    for x, y in zip(a, b):  # the mean step loss of each epoch, and the validation it led to
        assert abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, abs(x["loss"])), (x, y)
        assert abs(x["val_map"] - y["val_map"]) < 1e-3, (x, y)
    sa = torch.load(single / "last.pt", map_location="cpu", weights_only=False)["model"]
    sb = torch.load(ddp / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name].float(), sb[name].float(), rtol=1e-3, atol=2e-5), name


def test_two_gloo_processes_train_as_one_process_on_the_global_batch(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cli_ok("data", "synth", "--out", tmp_path / "data", "--sizes", "12,4,4", "--seed", "2", "--image-size", "64")
    common = ("--data", tmp_path / "data", "--config", tmp_path / "cfg.yaml")
    _torchrun(0, "train", *common, "--out", tmp_path / "single")
    out = _torchrun(2, "train", *common, "--out", tmp_path / "ddp")
    # one report, from rank 0; one start event; no shard caches left behind
    assert out.count("checkpoint:") == 1
    events = [json.loads(line)["event"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1
    assert json.loads((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()[0])["processes"] == 2
    assert not [p for p in (tmp_path / "ddp" / "features").iterdir() if p.name.startswith(".")]
    # the detector rank 0 fine-tuned, and the features the two ranks extracted half each
    da = torch.load(tmp_path / "single" / "detector.pt", weights_only=True)
    db = torch.load(tmp_path / "ddp" / "detector.pt", weights_only=True)
    assert all(torch.equal(da[k], db[k]) for k in da)
    for split in ("train", "val"):
        for name in ("bg", "fg", "mask", "boxes"):
            fa = np.load(tmp_path / "single" / "features" / split / f"{name}.npy").astype(np.float32)
            fb = np.load(tmp_path / "ddp" / "features" / split / f"{name}.npy").astype(np.float32)
            assert fa.shape == fb.shape and np.allclose(fa, fb, atol=2e-3), (split, name)
    _assert_same_training(tmp_path / "single", tmp_path / "ddp")
    # resume under torchrun: one more epoch on both sides, still the same
    _torchrun(0, "train", "--out", tmp_path / "single", "--resume", "--epochs", "3")
    _torchrun(2, "train", "--out", tmp_path / "ddp", "--resume", "--epochs", "3")
    _assert_same_training(tmp_path / "single", tmp_path / "ddp")
