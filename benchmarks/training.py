"""Seconds per training epoch, this code against an earlier commit, same config, data and batches.

Each version runs its own ``fbnet.train.train`` on the recipe's cached features in a fresh
process (the earlier one from a ``git archive`` on PYTHONPATH); the epoch's progress bar is
wrapped to time the first ``--steps`` optimisation steps and then stop the run. Seconds per
epoch = steps per epoch x the median step (the epoch's validation is not included). Both
versions share the first steps' batches (same seed), so they do the same work.

    python benchmarks/training.py --data data/flickr8k --config configs/flickr8k.yaml
    python benchmarks/training.py --fine-tuned --baseline 84fea43 --steps 30

(``--fine-tuned``: steps that train the backbone's top, as every epoch after the recipe's first.)

needs the Flickr8k recipe's feature cache (``fbnet train`` makes it); nothing else may run
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, shown, source_at, write_section

#: TrainConfig keys this code added after the baseline (dropped from the config both versions run).
NEW_TRAIN_KEYS = ("patience", "plateau_decay", "precision", "device")

WORKER = r"""
import json, sys, time
import fbnet.train as train_mod
from fbnet.config import FBNetConfig
from fbnet.data.manifest import load_dataset

cfg_path, data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stamps, total = [], {}

class Done(Exception):
    pass

def timed(iterable, desc="", **kw):
    if not str(desc).startswith("epoch"):
        yield from iterable
        return
    total["steps"] = len(iterable)
    for i, x in enumerate(iterable):
        stamps.append(time.perf_counter())
        if i == steps + 1:  # the first step's end is the second stamp; steps + 1 stamps bound steps steps
            raise Done
        yield x

train_mod.tqdm = lambda it, **kw: _Bar(timed(it, **kw))

class _Bar:
    def __init__(self, gen):
        self.gen = gen
    def __iter__(self):
        return self.gen
    def set_postfix(self, **kw):
        pass

cfg = FBNetConfig.load(cfg_path)
try:
    train_mod.train(cfg, load_dataset(data), out, echo=lambda *a: None, choose_weights=False)
except Done:
    pass
steps_s = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # skip the first step (warm-up)
print(json.dumps({"steps_per_epoch": total["steps"], "step_s": steps_s}))
"""


def measure(src: Path | None, config: Path, data: Path, steps: int) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory() as out:
        # -P: the working directory (this checkout) must not shadow the version on PYTHONPATH
        res = subprocess.run([sys.executable, "-P", "-c", WORKER, str(config), str(data), out, str(steps)],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"training worker failed:\n{res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    median = statistics.median(got["step_s"])
    return {"steps": len(got["step_s"]), "median_step_s": median, "steps_per_epoch": got["steps_per_epoch"],
            "epoch_s": median * got["steps_per_epoch"]}


def random_step_seconds(config: Path, device: str, steps: int, box_probs: list[float], n_images: int = 512,
                        vocab: int = 7371, group=None) -> float:
    """Median seconds of :func:`fbnet.train.train_step` on ``device`` with random features and
    captions of ``config``'s shapes (1280-d MobileNetV2 blocks, J box slots filled with the box
    counts drawn from ``box_probs``): for a GPU host that has no Flickr8k copy. With ``group`` (a
    :class:`fbnet.distributed.Group`), the step of one torchrun process on the same global batches."""
    import time

    import numpy as np
    import torch

    from fbnet.config import FBNetConfig
    from fbnet.features import SplitFeatures
    from fbnet.models.fbnet import FBNet
    from fbnet.pipeline import Captions
    from fbnet.train import BatchLoss, data_parallel, train_step
    from fbnet.windows import blocks_upto

    cfg = FBNetConfig.load(config)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    j, nb, c = cfg.model.detector.max_boxes, blocks_upto(cfg.model.levels), 1280
    counts = rng.choice(np.arange(1, len(box_probs) + 1), size=n_images, p=box_probs)
    feats = SplitFeatures(rng.normal(size=(n_images, nb, c)).astype(np.float16),
                          rng.normal(size=(n_images, j, nb, c)).astype(np.float16),
                          np.arange(j)[None] < counts[:, None], np.zeros((n_images, j, 4), np.float32),
                          canvas=cfg.model.backbone.image_size)
    lengths = rng.integers(4, cfg.data.max_words, size=5 * n_images)
    caps = Captions(rng.integers(2, vocab, size=(5 * n_images, cfg.data.max_words)), lengths,
                    np.repeat(np.arange(n_images), 5), None, None)
    model = FBNet(cfg.model, vocab, c).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step_loss = data_parallel(BatchLoss(model), group)
    times = []
    for step in range(steps + 1):
        idx = np.sort(rng.choice(len(lengths), size=cfg.train.batch_size, replace=False))
        t = time.perf_counter()
        train_step(step_loss, opt, cfg, feats, caps, idx, group)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def box_count_probs(cache: Path, max_boxes: int) -> list[float]:
    """Share of training images with 1 .. J boxes in the recipe's feature cache."""
    import numpy as np

    counts = np.load(cache / "train" / "mask.npy").sum(axis=1)
    return [float(np.mean(counts == n)) for n in range(1, max_boxes + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "flickr8k")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flickr8k.yaml")
    ap.add_argument("--baseline", default="bf6449b", help="git ref of the code to compare against")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each version, alternating")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-training")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--fine-tuned", action="store_true",
                    help="time steps that train the backbone's top (train.backbone_frozen_epochs: 0), not the "
                         "first epoch's frozen-top steps; writes the section 'Training speed: fine-tuned top'")
    ap.add_argument("--device", help="instead: time train_step on this device (e.g. cuda) with random "
                                      "features of the recipe's shapes; prints, writes nothing")
    ap.add_argument("--box-probs", help="with --device: shares of images with 1..J boxes (comma-separated); "
                                        "default: from the recipe's feature cache")
    args = ap.parse_args()
    if args.device:
        from fbnet.config import FBNetConfig

        cfg = FBNetConfig.load(args.config)
        probs = ([float(x) for x in args.box_probs.split(",")] if args.box_probs else
                 box_count_probs(ROOT / cfg.data.feature_cache, cfg.model.detector.max_boxes))
        step = random_step_seconds(args.config, args.device, args.steps, probs)
        per_epoch = -(-30000 // cfg.train.batch_size)  # Flickr8k: 6,000 images x 5 captions
        print(f"{args.device}: {step * 1000:.1f} ms/step x {per_epoch} steps = {step * per_epoch:.0f} s/epoch "
              f"(box counts 1..J: {', '.join(f'{p:.3f}' for p in probs)})")
        return
    # the same settings for both versions: the config without the keys the earlier code lacks
    # (float32); this code also with the recipe's bfloat16 encoders
    import yaml

    cfg = yaml.safe_load(args.config.read_text())
    for key in NEW_TRAIN_KEYS:
        cfg["train"].pop(key, None)
    if args.fine_tuned:
        cfg["train"]["backbone_frozen_epochs"] = 0
    args.work.mkdir(parents=True, exist_ok=True)
    plain, bf16 = args.work / "float32.yaml", args.work / "bfloat16.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    bf16.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "precision": "bfloat16"}}))
    versions = {f"before ({args.baseline}), float32": (source_at(args.baseline, args.work), plain),
                "after (this code), float32": (None, plain)}
    import torch

    from fbnet.train import uses_bfloat16

    if uses_bfloat16("auto", torch.device("cpu")):  # emulated bfloat16 is 5-6x slower: not worth a row
        versions["after (this code), bfloat16 encoders"] = (None, bf16)
    runs = {name: [] for name in versions}
    for _ in range(args.repeats):  # alternate, so a slow spell of the machine hits all alike
        for name, (src, config) in versions.items():
            r = measure(src, config, args.data, args.steps)
            runs[name].append(r)
            print(f"{name:24s} {r['median_step_s']:.3f} s/step x {r['steps_per_epoch']} steps = {r['epoch_s']:.0f} s/epoch")
    rows = {name: {**rs[0], "median_step_s": statistics.median(r["median_step_s"] for r in rs),
             "epoch_s": statistics.median(r["epoch_s"] for r in rs),
             "spread": (min(r["epoch_s"] for r in rs), max(r["epoch_s"] for r in rs))}
            for name, rs in runs.items()}
    before, after = rows[next(iter(rows))], min(rows.values(), key=lambda r: r["epoch_s"])
    heading = "## Training speed: fine-tuned top" if args.fine_tuned else "## Training speed"
    lines = [heading, "",
             f"`python benchmarks/training.py` on {machine()}. Config `{shown(args.config)}` on "
             f"`{shown(args.data)}` (cached features); per run, the median of {args.steps} steps "
             "after one warm-up step, times the steps of one epoch (validation not included); "
             f"{args.repeats} runs of each version, alternating, and their median (range in brackets). "
             "Both versions take the same batches"
             + (" and train the backbone's top in every step." if args.fine_tuned else "."), "",
             "| code | median step (s) | steps / epoch | seconds / epoch |", "| --- | --- | --- | --- |"]
    for name, r in rows.items():
        lo, hi = r["spread"]
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r['steps_per_epoch']} | {r['epoch_s']:.0f} ({lo:.0f}-{hi:.0f}) |")
    target = "an epoch <= 200 s" if args.fine_tuned else "2x"
    lines += ["", f"Speed-up, best of this code against the baseline: **{before['epoch_s'] / after['epoch_s']:.2f}x** "
              f"(target {target}).", ""]
    write_section(args.out, heading, "\n".join(lines))


if __name__ == "__main__":
    main()
