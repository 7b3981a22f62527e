"""The image query at MobileNetV2's output stride 16 against 32 (``model.backbone.output_stride``):
what the 14 x 14 map costs a served query, in one run.

    python benchmarks/stride.py --checkpoint runs/knob-os16/best.pt [--items 10000] [--repeats 60]

The checkpoint is exported as trained, and again with its backbone at the other output stride. The
weights are the same, since a dilation is a setting, not a parameter. The second bundle is a
latency reference only: its weights were not trained at that stride, so no accuracy is quoted for
it. Both bundles are timed by ``benchmarks/int8.py``'s ``latency``, one after the other in one process:
decode, detector and image encoder of single dev photos, and the whole two-stage image query (top
5 of a shortlist of 100) against ``--items`` synthetic float32 items. Figures are p50, ONNX Runtime
on the CPU. Accuracy is the training run's (BENCHMARKS.md "Knob: output stride 16"). Writes "##
Image query: output stride" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

from fbnet.checkpoint import load_checkpoint, save_checkpoint
from fbnet.data.manifest import load_dataset

from common import ROOT, machine, write_section
from int8 import latency

HEADING = "## Image query: output stride"


def at_stride(checkpoint: Path, stride: int, work: Path) -> Path:
    """``checkpoint`` with its backbone at output ``stride`` (the same weights), under ``work``."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt["config"]["model"]["backbone"].get("output_stride", 32) == stride:
        return checkpoint
    out = {k: v for k, v in ckpt.items() if k not in ("kind", "format_version", "versions")}
    out["config"] = copy.deepcopy(ckpt["config"])
    out["config"]["model"]["backbone"]["output_stride"] = stride
    return save_checkpoint(work / f"stride{stride}.pt", out)


def exported(checkpoint: Path, bundle: Path) -> Path:
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "fbnet.cli", "export", str(checkpoint), "--out", str(bundle)],
                       check=True)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "knob-os16" / "best.pt")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-stride")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: no checkpoint; train one first (docs/flickr8k.md)")
    ckpt = load_checkpoint(args.checkpoint)
    trained = ckpt["config"]["model"]["backbone"].get("output_stride", 32)
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = {s: exported(at_stride(args.checkpoint, s, args.work), args.work / f"bundle-stride{s}")
               for s in (trained, 48 - trained)}

    images = [Path(it.image) for it in load_dataset(ckpt["data_root"]).split("val")]
    timings = {s: latency(b, images[:50], args.work / "galleries", args.items, args.repeats)
               for s, b in bundles.items()}
    canvas = ckpt["config"]["model"]["backbone"]["image_size"]

    lines = [HEADING, "",
             f"`python benchmarks/stride.py --checkpoint {args.checkpoint} --items {args.items} "
             f"--repeats {args.repeats}` "
             f"({machine()}). The checkpoint (trained at output stride {trained}) exported as trained and at "
             f"stride {48 - trained} with the same weights, a latency reference only. "
             "p50 of single dev photos; the query searches "
             f"{args.items:,} synthetic float32 items two-stage (K = 100), ONNX Runtime on the CPU, one warm process.",
             "", f"| output stride | map at {canvas} px | decode ms | detector ms | image encoder ms "
             "| two-stage image query ms |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s in sorted(bundles):
        r, side = timings[s], canvas // s
        lines.append(f"| {s} | {side} x {side} | {r['decode']:.2f} | {r['detector']:.2f} | {r['image encoder']:.2f} "
                     f"| {r['two-stage image query']:.1f} |")
    ratio = {k: timings[16][k] / timings[32][k] for k in ("image encoder", "two-stage image query")}
    lines += ["", f"At stride 16 the image encoder takes {ratio['image encoder']:.2f}x its time at stride 32, "
              f"and the image query {ratio['two-stage image query']:.2f}x.", ""]
    section = "\n".join(lines)
    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
