"""A text query alone and in a batch of 8, stage by stage, with this checkout's runtime against an
earlier commit's: what one gather of each shortlist (``ImageRows``) changed.

    python benchmarks/batching.py --bundle runs/flickr8k/bundle --baseline a4e4b64

The stages are those of ``serving.py``'s profile (:func:`serving.stage_profile`, the same
measuring code for both versions): encode the captions, the first stage, gather the scorer's image
inputs of every shortlist, re-rank each shortlist (gather included), and the whole batch through
``SearchService``. Each version runs in its own process (``python -P``, its package from a
``git archive`` of its commit on PYTHONPATH), ``--runs`` times, alternating; the table gives the median of the
runs' medians. Gallery: 10,000 synthetic float32 items of the bundle's shapes, as in
``serving.py``. Nothing else may run beside it. Writes "## Text query stages: one gather" to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, source_at, write_section

HEADING = "## Text query stages: one gather"
HERE = Path(__file__).resolve().parent


def worker(bundle_dir: Path, data: Path, work: Path, items: int) -> None:
    """Print this process's stage profile as JSON (the package is whatever PYTHONPATH gives)."""
    from fbnet.data.manifest import load_dataset
    from fbnet.runtime.engine.bundle import open_bundle

    from galleries import synthetic_gallery
    from serving import stage_profile

    bundle = open_bundle(bundle_dir)
    dataset = load_dataset(data)
    test = dataset.split(dataset.report_split)
    gallery = synthetic_gallery(bundle, items, work, dtype="float32", image_files=[Path(i.image) for i in test])
    print(json.dumps(stage_profile(bundle_dir, gallery, [i.captions[0] for i in test][:200])))


def run(src: Path, args) -> list:
    """One worker's profile with the package at ``src`` (the measuring code is this checkout's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE)])}
    cmd = [sys.executable, "-P", str(HERE / "batching.py"), "--worker", "--bundle", str(args.bundle),
           "--data", str(args.data), "--work", str(args.work / "gallery"), "--items", str(args.items)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="a4e4b64", help="the earlier commit (default: the last before ImageRows)")
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "flickr8k" / "bundle")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "flickr8k", help="captions of its report split")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-batching")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.worker:
        return worker(args.bundle, args.data, args.work, args.items)
    args.work.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    versions = {f"before ({args.baseline})": source_at(args.baseline, args.work),
                f"after ({head})": source_at(head, args.work)}
    results: dict[str, list] = {v: [] for v in versions}
    for _ in range(args.runs):
        for name, src in versions.items():
            results[name].append({(stage, n): ms for stage, n, ms in run(src, args)})
            print(name, results[name][-1], flush=True)
    med = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}
    before, after = med.values()
    lines = [HEADING, "",
             f"`python benchmarks/batching.py --baseline {args.baseline}` ({machine()}): a text query alone and in "
             f"a batch of 8 against {args.items:,} synthetic float32 items of `{args.bundle}`'s "
             f"shapes, in-process; median ms of {args.runs} runs per version, alternating, each the median of 20 "
             "timings. Before: a shortlist was copied in full (every padded box slot of every key) by `take`, "
             "then again, cut to its box-count groups, for the scorer. After: `take` keeps the row numbers and "
             "the scorer's inputs are read once (`ImageRows`).", "",
             "| stage | before: 1 query | before: batch of 8 | after: 1 query | after: batch of 8 | "
             "batch of 8, after / before |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for stage in dict.fromkeys(s for s, _ in before):
        lines.append(f"| {stage} | {before[stage, 1]:.2f} | {before[stage, 8]:.2f} | {after[stage, 1]:.2f} | "
                     f"{after[stage, 8]:.2f} | {after[stage, 8] / before[stage, 8]:.2f}x |")
    whole = "whole batch (SearchService, re-ranks on lanes)"
    lines += ["", f"A batch of 8 through `SearchService` serves {8 * before[whole, 1] / before[whole, 8]:.2f}x a lone "
              f"query's rate before and {8 * after[whole, 1] / after[whole, 8]:.2f}x after (in-process, no HTTP).", ""]
    section = "\n".join(lines)
    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
