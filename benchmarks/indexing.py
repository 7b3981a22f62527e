"""Indexing throughput: single-process ``index`` against ``index --ray`` with 1 and 2 workers,
on the same images (Flickr8k dev photos) with the same bundle; images/s, captions not indexed.

    python benchmarks/indexing.py --bundle runs/flickr8k/bundle

Each Ray worker is an actor with one ONNX Runtime session of ``--threads`` threads; the local
cluster is started by the script (its start-up is included: it is part of a job's cost). Writes
"## Indexing on Ray" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from fbnet.runtime.engine.backends import OnnxRuntimeBackend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.runtime.gallery.build import build_gallery
from fbnet.runtime.gallery.ray_index import index_on_ray

from common import ROOT, machine, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "flickr8k" / "bundle")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k" / "images")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--shard-size", type=int, default=48)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-indexing")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    images = sorted(args.images.glob("*.jpg"))[: args.n]
    bundle = open_bundle(args.bundle)
    shutil.rmtree(args.work, ignore_errors=True)
    rows = []
    t = time.perf_counter()
    build_gallery(Retriever(bundle, OnnxRuntimeBackend(bundle)), images, [], args.work / "single")
    rows.append(("single process (`index`), ONNX Runtime on all cores", time.perf_counter() - t))
    for workers in (1, 2):
        threads = max(1, 2 // workers)
        t = time.perf_counter()
        index_on_ray(args.bundle, images, [], args.work / f"ray-{workers}", args.shard_size, workers=workers,
                     threads_per_worker=threads, log=lambda *a: None)
        rows.append((f"`index --ray`, {workers} worker(s) x {threads} thread(s), local cluster", time.perf_counter() - t))
    base = rows[0][1]
    lines = ["## Indexing on Ray", "",
             f"`python benchmarks/indexing.py` on {machine()}: {len(images)} Flickr8k dev photos (detector, "
             f"image encoder, float32 store), shards of {args.shard_size}, bundle `{args.bundle.name}` "
             f"(d = {bundle.model.embed_dim}).", "",
             "| indexer | seconds | images/s | vs single process |", "| --- | ---: | ---: | ---: |"]
    for label, secs in rows:
        lines.append(f"| {label} | {secs:.1f} | {len(images) / secs:.1f} | {base / secs:.2f}x |")
    lines += ["", "On one 2-core machine Ray cannot add cores; what it adds is the same code on many "
              "machines (`--ray ADDRESS`), where throughput scales with the workers (each encodes whole "
              "shards, no data moves between them but the images they read and the shards they write).", ""]
    write_section(args.out, "## Indexing on Ray", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
