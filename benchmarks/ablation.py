"""FB-Net's ablation on a dataset at an equal, small training budget: B-Net only, F-Net only, both
(the recipe's loss), and both with the paper's DSAW loss instead.

    python benchmarks/ablation.py --config configs/flickr8k.yaml --data data/flickr8k --epochs 1

Every variant is the recipe with one change, trained for ``--epochs`` epochs from the same seed on
the same cached features (``data.feature_cache``), and compared on the recipe's per-epoch
validation (``train.val_captions`` captions per image, equal fusion weights), read from each
run's ``log.jsonl``. Runs go under ``runs/ablation/<variant>``; a finished variant is not rerun.
Writes the section "Ablation" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fbnet.config import FBNetConfig
from fbnet.data.manifest import load_dataset
from fbnet.train import train

from common import ROOT, machine, shown, write_section

VARIANTS = [  # (run directory, label, changes to the recipe)
    ("b-only", "B-Net only (the recipe's loss)", {"model.branches": ["background"]}),
    ("f-only", "F-Net only (the recipe's loss)", {"model.branches": ["foreground"]}),
    ("both", "B-Net + F-Net: the recipe", {}),
    ("both-dsaw", "B-Net + F-Net (DSAW, eqs. 16-21)", {"loss.name": "dsaw", "loss.warmup_epochs": 0}),
]


def epoch_records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    records = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
    return [r for r in records if r.get("event") == "epoch"]


def variant_config(path: Path, changes: dict, epochs: int) -> FBNetConfig:
    data = FBNetConfig.load(path).to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    data["train"]["epochs"] = epochs
    return FBNetConfig.from_dict(data, f"{path} + {changes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flickr8k.yaml")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "flickr8k")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--recipe-run", type=Path, default=ROOT / "runs" / "flickr8k",
                    help="the recipe's own run, whose first epochs stand for the unchanged variant")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    dataset = load_dataset(args.data)
    rows = []
    for slug, name, changes in VARIANTS:
        cfg = variant_config(args.config, changes, args.epochs)
        run = args.runs / slug
        # the recipe itself: its own full run already logged these epochs (training is deterministic)
        if not changes and args.recipe_run and len(epoch_records(args.recipe_run)) >= args.epochs:
            run = args.recipe_run
        epochs = epoch_records(run)
        if len(epochs) < args.epochs:
            t0 = time.time()
            train(cfg, dataset, run, resume=(run / "last.pt").is_file(), choose_weights=False)
            print(f"{name}: {time.time() - t0:.0f}s")
            epochs = epoch_records(run)
        last = epochs[args.epochs - 1]
        rows.append((name, last["val_rsum"], last["val_map"], sum(e["seconds"] for e in epochs[: args.epochs])))
    cfg = FBNetConfig.load(args.config)
    per = cfg.train.val_captions or "all"
    lines = [
        "## Ablation",
        "",
        f"Machine: {machine()}. Dataset `{args.data.name}`, config `{args.config.name}` (d = {cfg.model.embed_dim}, "
        f"batch {cfg.train.batch_size}, lr {cfg.train.lr}), {args.epochs} epoch(s) per variant from the same seed "
        f"and cached features. Validation: every validation image with {per} caption(s) each, equal fusion "
        "weights (the recipe's per-epoch check, not the final fused report).",
        f"Regenerate: `python benchmarks/ablation.py --config {shown(args.config)} "
        f"--data {shown(args.data)} --epochs {args.epochs}`.",
        "",
        "| variant | val R@sum | val MAP | training s (incl. validation) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {r:.1f} | {m:.4f} | {s:.0f} |" for n, r, m, s in rows]
    write_section(args.out, "## Ablation", "\n".join(lines + [""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
