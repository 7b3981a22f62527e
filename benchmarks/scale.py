"""Galleries of a million images on this machine: the IVF first stage against exact search, and a
1,000,000-image coded gallery served by ``fbnet-serve-cli serve``.

    python benchmarks/scale.py --bundle runs/flickr8k/bundle --store sq4

Synthetic features of the bundle's shapes (d, J, levels), generated here: the first-stage
vectors (level-1 B-Net blocks) are clustered unit vectors (:func:`clustered`: 256 topics, 20,000
centres, noise; IVF recall depends on such structure), distinct for every image; the other blocks are
the codes of a pool of 20,000 encoded items, tiled (decoding and scoring cost the same whatever
the values), with box counts drawn as on Flickr8k. The store's encoding speed is measured on the
pool, so the build time of a real million can be estimated from it. Text queries are Flickr8k dev
captions sent over loopback HTTP one at a time. Writes "## A million images" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np

from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.gallery.build import gallery_meta
from fbnet.runtime.gallery.first_stage import INDEX_FILE, FirstStage, choose_spec
from fbnet.runtime.gallery.stores import write_coded

from common import ROOT, machine, shown, write_section
from galleries import box_mask, key_shapes
from serving import Server, rss_mb

POOL = 20_000


def clustered(n: int, d: int, seed: int, topics: int = 256, centres: int = 20_000, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors with two levels of structure, as trained embeddings have: ``topics`` broad
    directions, ``centres`` narrower ones within them, plus noise, in equal parts (``topic +
    centre + noise``, each standard normal, before normalising). A query's nearest hundred are then mostly its topic's, which is
    what makes an inverted file work; on structureless vectors no first stage but a full scan can."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((topics, d), dtype=np.float32)
    c = t[rng.integers(0, topics, centres)] + rng.standard_normal((centres, d), dtype=np.float32)
    out = np.empty((n, d), np.float16)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = c[rng.integers(0, centres, hi - lo)] + rng.standard_normal((hi - lo, d), dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def first_stage_rows(vectors: np.ndarray, queries: np.ndarray, k: int = 100) -> tuple[list[str], FirstStage, str]:
    """Recall of the IVF top-k against the flat top-k, and one-query latency, at several nprobe."""
    t = time.perf_counter()
    flat = FirstStage(vectors, spec="Flat")
    t_flat = time.perf_counter() - t
    spec = choose_spec(len(vectors), vectors.shape[1])
    t = time.perf_counter()
    ivf = FirstStage(vectors, spec=spec)
    t_ivf = time.perf_counter() - t
    exact = flat.top(queries, k)[1]
    lat = lambda stage, **kw: statistics.median(_timed(lambda q: stage.top(q[None], k, **kw), queries[:50]))  # noqa: E731
    rows = [f"| Flat (exact) | - | 1.000 | {lat(flat):.1f} | {t_flat:.0f} |"]
    for nprobe in (8, 32, 128):
        got = ivf.top(queries, k, nprobe=nprobe)[1]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)])
        rows.append(f"| {spec} | {nprobe} | {recall:.3f} | {lat(ivf, nprobe=nprobe):.2f} | {t_ivf:.0f} |")
    return rows, ivf, spec


def _timed(fn, queries) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t) * 1000)
    return out


def build_million(bundle, n: int, store: str, out: Path, b1: np.ndarray, ivf: FirstStage, spec: str) -> dict:
    """The coded gallery directory (images only) and what building it took."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    rng, d, j = np.random.default_rng(2), bundle.model.embed_dim, bundle.model.max_boxes
    pool_mask = box_mask(rng, POOL, j)
    reps = -(-n // POOL)
    np.save(out / "images" / "fg_mask.npy", np.tile(pool_mask, (reps, 1))[:n])
    np.save(out / "images" / "B1.npy", b1[:, None, :])
    ivf.save(out / "images" / INDEX_FILE)
    coded, encode = {}, {}
    for key, (k, _) in key_shapes(bundle).items():
        if key == "B1":
            continue
        x = rng.standard_normal((POOL, k, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        counts = pool_mask.sum(axis=1).astype(np.int64) * (k // j) if key[0] == "F" else np.full(POOL, k, np.int64)
        pool_dir = out / "pool"
        pool_dir.mkdir(exist_ok=True)
        t = time.perf_counter()
        write_coded(pool_dir, key, x, counts, store)
        encode[key] = counts.sum() / (time.perf_counter() - t)
        pool_codes = np.load(pool_dir / f"{key}.codes.npy")
        all_counts = np.tile(counts, reps)[:n]
        offsets = np.concatenate([[0], np.cumsum(all_counts)]).astype(np.int64)
        codes = np.lib.format.open_memmap(out / "images" / f"{key}.codes.npy", mode="w+", dtype=np.uint8,
                                          shape=(int(offsets[-1]), pool_codes.shape[1]))
        for r in range(reps):  # item i is pool item i % POOL
            lo, hi = r * POOL, min((r + 1) * POOL, n)
            codes[offsets[lo]:offsets[hi]] = pool_codes[: offsets[hi] - offsets[lo]]
        codes.flush()
        del codes
        np.save(out / "images" / f"{key}.offsets.npy", offsets)
        shutil.copy(pool_dir / f"{key}.codec.faiss", out / "images")
        coded[key] = {"shape": [n, k, d], "bytes_per_vector": int(pool_codes.shape[1]), "vectors": int(offsets[-1])}
    shutil.rmtree(out / "pool")
    replace(gallery_meta(bundle, [f"synthetic/{i:07d}.jpg" for i in range(n)], [], "float32", store),
            n_images=n, n_captions=0, first_stage={"images": spec}, coded={"images": coded}).save(out / "gallery.json")
    return {"encode_vectors_s": statistics.median(encode.values())}


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (flushed first), as for a gallery built earlier:
    the pages the build just wrote would otherwise be mapped into the server in large folios on its
    first touch, and its RSS would count them."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def memory_by_mapping(pid: int, gallery: Path) -> dict[str, float]:
    """Resident MB of process ``pid`` by what its pages map (``/proc/<pid>/smaps``): each of the
    gallery's files by name, shared libraries together, and anonymous memory (heap, allocator
    arenas, thread stacks: what Python, numpy, FAISS and ONNX Runtime allocated)."""
    out: dict[str, float] = {}
    where = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if "-" in first[0] and len(first) >= 5:  # a mapping's header: range perms offset dev inode [path]
            path = first[5].strip() if len(first) == 6 else ""
            if not path or path.startswith("["):
                where = "anonymous"
            elif path.startswith(str(gallery)):
                where = f"gallery: {Path(path).relative_to(gallery)}"
            elif ".so" in Path(path).name:
                where = "shared libraries"
            else:
                where = f"other file: {Path(path).name}"
        elif first[0] == "Rss:":
            out[where] = out.get(where, 0.0) + int(first[1]) / 1024
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "flickr8k" / "bundle")
    ap.add_argument("--store", default="sq4")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-scale")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    bundle = open_bundle(args.bundle)
    d = bundle.model.embed_dim
    b1 = clustered(args.n, d, seed=0)
    picks = np.random.default_rng(3).choice(args.n, 200, replace=False)
    noisy = b1[picks].astype(np.float32) + 0.03 * np.random.default_rng(4).standard_normal((200, d), dtype=np.float32)
    queries = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    print("first stage ...", flush=True)
    fs_rows, ivf, spec = first_stage_rows(b1, queries)
    print("\n".join(fs_rows), flush=True)
    gallery = args.work / f"million-{args.store}"
    t = time.perf_counter()
    built = build_million(bundle, args.n, args.store, gallery, b1, ivf, spec)
    build_s = time.perf_counter() - t
    disk = sum(p.stat().st_size for p in gallery.rglob("*") if p.is_file())
    evict(gallery)
    captions = [line.split("\t", 1)[1] for line in (ROOT / "../shared/data/flickr8k/captions.txt").resolve()
                .read_text().splitlines()[: args.queries]] if (ROOT / "../shared").is_dir() else \
        [f"a dog runs on the grass {i}" for i in range(args.queries)]
    server = Server([sys.executable, "-m", "fbnet.runtime.cli", "serve", "--bundle", str(args.bundle), "--gallery",
                     str(gallery), "--port", str(args.port), "--quiet"], args.port, f"http://127.0.0.1:{args.port}/ready")
    try:
        times = []
        for text in captions:
            body = json.dumps({"text": text, "top_k": 10}).encode()
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{args.port}/search/text", body,
                                                               {"Content-Type": "application/json"})) as r:
                r.read()
            times.append((time.perf_counter() - t) * 1000)
        rss = rss_mb(server.proc.pid)
        parts = memory_by_mapping(server.proc.pid, gallery.resolve())
    finally:
        server.stop()
    times = times[5:]  # the first answers warm the caches
    p50, p95 = statistics.median(times), sorted(times)[int(0.95 * len(times))]
    per_image = disk / args.n
    lines = ["## A million images", "",
             f"`python benchmarks/scale.py --bundle {shown(args.bundle)} "
             f"--store {args.store}` on {machine()}. Synthetic features of the bundle's shapes (see the script's docstring).",
             "", f"First stage over {args.n:,} level-1 vectors (d = {d}), 200 queries, top 100:", "",
             "| index | nprobe | recall@100 vs flat | p50 ms (1 query) | build s |", "| --- | ---: | ---: | ---: | ---: |",
             *fs_rows, "",
             f"Gallery: {args.n:,} images, store `{args.store}`, first stage `{spec}` (nprobe 32 by default).", "",
             "| measure | value |", "| --- | --- |",
             f"| build time here (codes tiled from a {POOL:,}-item pool, IVF training included above) | {build_s:.0f} s |",
             f"| store encoding speed (2 cores, measured on the pool) | {built['encode_vectors_s']:,.0f} vectors/s |",
             f"| bytes on disk | {disk / 1e9:.2f} GB ({per_image / 1e3:.1f} KB per image) |",
             f"| RSS of the warm server (`fbnet-serve-cli serve`) | {rss:,.0f} MB |",
             f"| text query over HTTP, two-stage (K = 100), p50 / p95 | {p50:.1f} / {p95:.1f} ms ({len(times)} queries) |",
             "", f"Target: p50 <= 100 ms on 2 cores: {'met' if p50 <= 100 else '**not met**'} ({p50:.1f} ms).", "",
             "The warm server's resident memory by what it maps (`/proc/<pid>/smaps`, after the queries; the "
             "gallery's files were dropped from the page cache before the server started, as for a gallery built "
             "earlier):", "",
             "| mapping | resident MB |", "| --- | ---: |",
             *(f"| {name} | {mb:,.0f} |" for name, mb in parts.items() if mb >= 1), ""]
    write_section(args.out, "## A million images", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
