"""Serving under load: throughput and latency of the built-in server and of Triton (PyTriton) for
1, 8, 32 and 128 concurrent clients, text and image queries, against a 10,000-item gallery.

    python benchmarks/serving.py                      # default model: runs/synth-seed0/best.pt

``baseline@45f67f6`` (in the default ``--servers``) also loads the server as it was before the
micro-batching rewrite (``http.server``, one lock around the model calls), text queries only.

Each server runs as its own process (``fbnet-serve-cli serve`` / ``fbnet-serve-cli triton`` from
the PyTriton environment), warmed, then loaded by asyncio clients in this process, each on its own
keep-alive connection sending requests back to back for ``--seconds`` per cell. Text queries are
captions of the dataset's test split; image queries are its test images' file bytes. The gallery
is synthetic float32 features of the bundle's shapes (10,000 images and 10,000 captions; float32 as
``index`` writes by default; image paths are real files so the page works). Server RSS is read from
/proc (Triton: the CLI's process plus ``tritonserver`` and its two Python-backend stubs). Writes the
"Serving under load" section of BENCHMARKS.md. The load generator shares the 2 cores with the server; nothing else should run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fbnet.checkpoint import load_checkpoint
from fbnet.data.manifest import load_dataset
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.serving.triton_env import build as build_triton_env

from common import ROOT, machine, source_at, wait_http, write_section
from galleries import synthetic_gallery

TARGET_SCALING, TARGET_P99_MS = 2.5, 150.0


# -- requests ---------------------------------------------------------------------------------------
def builtin_request(kind: str, payload: bytes | str) -> bytes:
    if kind == "text":
        body, path = json.dumps({"text": payload, "top_k": 5}).encode(), "/search/text"
    else:
        body, path = payload, "/search/image?top_k=5"
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + body


def triton_request(kind: str, payload: bytes | str) -> bytes:
    """KServe v2 inference request with the binary-data extension (the BYTES element is length-prefixed)."""
    data = payload.encode() if isinstance(payload, str) else payload
    element = struct.pack("<I", len(data)) + data
    top_k = struct.pack("<i", 5)
    header = json.dumps({"inputs": [
        {"name": kind, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(element)}},
        {"name": "top_k", "shape": [1, 1], "datatype": "INT32", "parameters": {"binary_data_size": 4}}],
        "outputs": [{"name": "result", "parameters": {"binary_data": False}}]}).encode()
    body = header + element + top_k
    return (f"POST /v2/models/fbnet_search_{kind}/infer HTTP/1.1\r\nHost: bench\r\n"
            f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {len(header)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + body


async def read_response(reader) -> tuple[int, bool]:
    """(status, whether the server keeps the connection open); the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    await reader.readexactly(int(match.group(1)) if match else 0)
    closes = head.startswith(b"HTTP/1.0") or re.search(rb"(?i)connection:\s*close", head) is not None
    return status, not closes


# -- load -------------------------------------------------------------------------------------------
async def one_client(port: int, requests: list[bytes], offset: int, stop_at: float, out: list) -> None:
    conn, i = None, offset
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
            conn[1].write(requests[i % len(requests)])
            await conn[1].drain()
            status, keep = await asyncio.wait_for(read_response(conn[0]), 60)
            out.append((status, time.perf_counter() - t0))
            if not keep:  # HTTP/1.0 servers (the baseline) close after each answer
                conn[1].close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            out.append((type(exc).__name__, time.perf_counter() - t0))
            if conn is not None:
                conn[1].close()
            conn = None
        i += 1
    if conn is not None:
        conn[1].close()


def load(port: int, requests: list[bytes], clients: int, seconds: float) -> dict:
    out: list = []

    async def run():
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(port, requests, c * 7, stop_at, out) for c in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    ok = sorted(lat for status, lat in out if status == 200)
    errors = {}
    for status, _ in out:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] * 1000 if ok else float("nan")  # noqa: E731
    return {"clients": clients, "ok": len(ok), "rps": len(ok) / wall, "p50": statistics.median(ok) * 1000 if ok
            else float("nan"), "p99": pct(0.99), "errors": errors}


# -- servers ----------------------------------------------------------------------------------------
def rss_mb(root_pid: int) -> float:
    """Resident memory of a process and its descendants."""
    children = subprocess.run(["pgrep", "-P", str(root_pid)], capture_output=True, text=True).stdout.split()
    total = 0.0
    try:
        m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{root_pid}/status").read_text())
        total += int(m.group(1)) / 1024 if m else 0
    except OSError:
        return 0.0
    return total + sum(rss_mb(int(c)) for c in children)


class Server:
    def __init__(self, cmd: list[str], port: int, ready_url: str, env=None):
        self.port = port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_http(ready_url)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def start_builtin(bundle: Path, gallery: Path, port: int, http: str) -> Server:
    cmd = [sys.executable, "-m", "fbnet.runtime.cli", "serve", "--bundle", str(bundle), "--gallery", str(gallery),
           "--port", str(port), "--quiet", "--http", http]
    return Server(cmd, port, f"http://127.0.0.1:{port}/ready")


def start_triton(bundle: Path, gallery: Path, port: int, work: Path) -> Server:
    python = build_triton_env()
    cmd = [str(python), "-m", "fbnet.runtime.cli", "triton", "--bundle", str(bundle), "--gallery", str(gallery),
           "--http-port", str(port), "--grpc-port", str(port + 1), "--metrics-port", str(port + 2),
           "--log-file", str(work / "triton.log")]
    return Server(cmd, port, f"http://127.0.0.1:{port}/v2/models/fbnet_search_image/ready")


def start_baseline(ref: str, bundle: Path, gallery: Path, port: int, work: Path) -> Server:
    """The server as it was at git ``ref`` (the standard library's ``http.server``, one lock, no
    batching)."""
    src = source_at(ref, work)
    # -P: the working directory (this checkout) must not shadow the version on PYTHONPATH
    cmd = [sys.executable, "-P", "-m", "fbnet.runtime.cli", "serve", "--bundle", str(bundle), "--gallery", str(gallery),
           "--port", str(port), "--quiet"]
    return Server(cmd, port, f"http://127.0.0.1:{port}/health", env={**os.environ, "PYTHONPATH": str(src)})


# -- where a query's time goes ----------------------------------------------------------------------
def stage_profile(bundle_dir: Path, gallery, captions: list[str], repeats: int = 20) -> list[tuple]:
    """Median ms of each stage of text search, for one query and for a batch of 8, in this process."""
    from fbnet.runtime.engine.backends import select_backend
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.first_stage import pooled_texts
    from fbnet.runtime.serving.service import SearchService, TextQuery

    from common import timeit

    bundle = open_bundle(bundle_dir)
    retriever = Retriever(bundle, select_backend(bundle, "onnxruntime"))
    service = SearchService(retriever, gallery, 100, os.cpu_count() or 1)  # as `serve` runs it
    service.warm()
    stage = service.searcher.image_stage
    rows = []
    for n in (1, 8):
        caps = captions[:n]
        feats = retriever.encode_texts(caps)
        _, cand = stage.top(pooled_texts(feats), 100)
        shortlists = [gallery.image_features.take(np.sort(c)) for c in cand]

        def rerank(shortlists=shortlists, feats=feats):
            return [retriever.score(im, feats.take(slice(q, q + 1))) for q, im in enumerate(shortlists)]

        def gather(cand=cand):  # the scorer's image inputs, as Retriever.score reads them
            return [[im.group_feeds(rows, boxes) for rows, boxes in im.box_groups(1, retriever.call_cost)]
                    for im in (gallery.image_features.take(np.sort(c)) for c in cand)]

        t = {"encode captions": timeit(lambda: retriever.encode_texts(caps), repeats, 2)["median"],
             "first stage (FAISS, 10k)": timeit(lambda: stage.top(pooled_texts(feats), 100), repeats, 2)["median"],
             "gather shortlists (the scorer's image inputs)": timeit(gather, repeats, 2)["median"],
             "re-rank 100 x 1 per query, one after another (gather included)": timeit(rerank, repeats, 2)["median"],
             "whole batch (SearchService, re-ranks on lanes)": timeit(lambda: service.search_texts([TextQuery(c) for c in caps]),
                                                   repeats, 2)["median"]}
        rows += [(name, n, ms) for name, ms in t.items()]
    return rows


# -- report -----------------------------------------------------------------------------------------
def measure(server: Server, name: str, make, queries: dict, clients: list[int], seconds: float) -> list[dict]:
    rows = []
    rest = rss_mb(server.proc.pid)
    for kind, payloads in queries.items():
        requests = [make(kind, p) for p in payloads]
        load(server.port, requests, 4, 2)  # warm-up
        for c in clients:
            r = load(server.port, requests, c, seconds)
            r.update(server=name, kind=kind, rss_rest=rest, rss_load=rss_mb(server.proc.pid))
            print(f"{name:24s} {kind:5s} {c:4d} clients: {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  "
                  f"p99 {r['p99']:7.1f} ms  errors {r['errors'] or 0}  RSS {r['rss_load']:.0f} MB", flush=True)
            rows.append(r)
    return rows


def verdicts(rows: list[dict], name: str) -> list[str]:
    text = {r["clients"]: r for r in rows if r["server"] == name and r["kind"] == "text"}
    out = []
    if 1 in text and 8 in text:
        scale = text[8]["rps"] / text[1]["rps"]
        ok = scale >= TARGET_SCALING and text[8]["p99"] <= TARGET_P99_MS
        out.append(f"- {name}, text, 8 clients: {scale:.2f}x one client's throughput (target >= {TARGET_SCALING}x), "
                   f"p99 {text[8]['p99']:.0f} ms (target <= {TARGET_P99_MS:.0f} ms): **{'met' if ok else 'missed'}**.")
    for c in (32, 128):
        if c in text and 8 in text:
            r = text[c]
            ok = not r["errors"] and r["rps"] >= text[8]["rps"] * 0.97
            out.append(f"- {name}, text, {c} clients: {sum(r['errors'].values()) if r['errors'] else 0} errors, "
                       f"{r['rps']:.0f} req/s against {text[8]['rps']:.0f} at 8 clients: "
                       f"**{'met' if ok else 'missed'}** (no errors, throughput not below 8 clients' within 3% noise).")
    return out


def section(rows: list[dict], stacks: list[dict], items: int, seconds: float, bundle, profile: list) -> str:
    lines = ["## Serving under load", "",
             f"`python benchmarks/serving.py` ({time.strftime('%Y-%m-%d')}; {machine()}). One run; each cell "
             f"is {seconds:g} s of back-to-back requests per client on keep-alive connections, load generator "
             f"(asyncio, one process) on the same 2 cores. Gallery: {items:,} images and {items:,} captions of "
             f"the default model's shapes (d = {bundle.model.embed_dim}, J = {bundle.model.max_boxes}, "
             "float32), two-stage search, top 5 of a shortlist of 100, ONNX Runtime on the CPU. Built-in "
             "server: `fbnet-serve-cli serve` (uvicorn + Starlette, one micro-batching worker, max batch 64, "
             "max wait 0, a batch's re-ranks on one one-thread session per core). Triton: `fbnet-serve-cli "
             "triton` (the Triton 2.51 server of PyTriton 0.7, the same service as two Python-backend models, "
             "dynamic batcher max batch 64, KServe v2 HTTP with binary tensors).", "",
             "| server | query | clients | req/s | p50 ms | p99 ms | errors | RSS at rest MB | RSS under load MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['server']} | {r['kind']} | {r['clients']} | {r['rps']:.1f} | {r['p50']:.1f} | "
                     f"{r['p99']:.1f} | {errors} | {r['rss_rest']:.0f} | {r['rss_load']:.0f} |")
    if stacks:
        lines += ["", "HTTP stack of the built-in server (text queries, 8 clients, same run):", "",
                  "| uvicorn HTTP parser | req/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {s['server']} | {s['rps']:.1f} | {s['p50']:.1f} | {s['p99']:.1f} |" for s in stacks]
    if profile:
        ms = {(name, n): v for name, n, v in profile}
        lines += ["", "Where a text query's time goes (in-process, no HTTP; median ms, same run):", "",
                  "| stage | 1 query | batch of 8 | per query in the batch |", "| --- | ---: | ---: | ---: |"]
        for name in dict.fromkeys(name for name, _, _ in profile):
            lines.append(f"| {name} | {ms[name, 1]:.2f} | {ms[name, 8]:.2f} | {ms[name, 8] / 8:.2f} |")
    names = sorted({r["server"] for r in rows})
    lines += ["", "Targets (text queries):", ""] + [v for n in names for v in verdicts(rows, n)]
    if profile:
        lines += ["", cause(ms, os.cpu_count() or 1)]
    return "\n".join(lines) + "\n"


def cause(ms: dict, lanes: int) -> str:
    """Where the scaling stops on this machine, from the stage profile of the same run."""
    whole1 = ms["whole batch (SearchService, re-ranks on lanes)", 1]
    whole8 = ms["whole batch (SearchService, re-ranks on lanes)", 8] / 8
    rerank1 = ms["re-rank 100 x 1 per query, one after another (gather included)", 1]
    rerank8 = ms["re-rank 100 x 1 per query, one after another (gather included)", 8] / 8
    return (f"**Where the scaling stops.** A lone text query costs {whole1:.1f} ms in-process, {rerank1:.1f} of "
            f"them re-ranking its 100 shortlisted images (`reranker.onnx`). In a batch of 8 a query costs "
            f"{whole8:.1f} ms: one encoder call and one first-stage call serve the batch, and the re-ranks run "
            f"side by side on {lanes} one-thread ONNX Runtime sessions (one after another on the two-thread "
            f"session they take {rerank8:.1f} ms a query: small scorer calls use two threads poorly). The "
            f"worker's ceiling on these 2 cores is therefore about {1000 / whole8:.0f} queries/s, "
            f"{whole1 / whole8:.2f}x a lone query, before HTTP, JSON and the load generator take their share of "
            f"the same cores. Past that, re-ranking is arithmetic linear in the pairs scored. Reaching 2.5x needs "
            f"it cheaper: skipping padded box slots (a dynamic box axis), a lower-precision scorer, a GPU (where "
            f"per-call overhead dominates and batching pays), or more cores. Triton adds its own cost: a second "
            f"process, protobuf/JSON conversion, and the Python backend's shared-memory hop to its stub per batch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "runs" / "synth-seed0" / "bundle",
                    help="exported from the run's best.pt when missing")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--servers", default="builtin,triton,baseline@45f67f6",
                    help="builtin, triton, baseline@GIT_REF (the server as it was at that commit)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serving")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        from fbnet.export.bundle import export_bundle

        ckpt = args.bundle.parent / "best.pt"
        if not ckpt.is_file():
            sys.exit(f"{ckpt}: no checkpoint; run `fbnet train` first (README, Quick start)")
        export_bundle(ckpt, args.bundle, log=print)
    bundle = open_bundle(args.bundle)
    source = json.loads((args.bundle / "manifest.json").read_text())["source_checkpoint"]["path"]
    dataset = load_dataset(load_checkpoint(source)["data_root"])
    test = dataset.split(dataset.report_split)
    args.work.mkdir(parents=True, exist_ok=True)
    gallery = synthetic_gallery(bundle, args.items, args.work, dtype="float32",  # index's default
                                image_files=[Path(i.image) for i in test])
    queries = {"text": [i.captions[0] for i in test][:200], "image": [Path(i.image).read_bytes() for i in test][:50]}
    clients = [int(c) for c in args.clients.split(",")]
    profile = stage_profile(args.bundle, gallery, queries["text"])
    for name, n, ms in profile:
        print(f"{name:30s} {n} {ms:8.2f} ms", flush=True)
    rows, stacks = [], []
    for name in args.servers.split(","):
        if name == "builtin":
            for http in ("h11", "httptools"):
                server = start_builtin(args.bundle, gallery.root, args.port, http)
                try:
                    if http == "httptools":
                        rows += measure(server, "built-in (uvicorn)", builtin_request, queries, clients, args.seconds)
                    r = load(server.port, [builtin_request("text", q) for q in queries["text"]], 8, args.seconds)
                    stacks.append({**r, "server": http})
                finally:
                    server.stop()
        elif name.startswith("baseline@"):
            ref = name.split("@", 1)[1]
            server = start_baseline(ref, args.bundle, gallery.root, args.port + 20, args.work)
            try:
                rows += measure(server, f"before: http.server ({ref})", builtin_request, {"text": queries["text"]},
                                clients, args.seconds)
            finally:
                server.stop()
        elif name == "triton":
            server = start_triton(args.bundle, gallery.root, args.port + 10, args.work)
            try:
                rows += measure(server, "Triton (PyTriton)", triton_request, queries, clients, args.seconds)
            finally:
                server.stop()
    write_section(args.out, "## Serving under load", section(rows, stacks, args.items, args.seconds, bundle, profile))
    (args.work / "serving.json").write_text(json.dumps({"rows": rows, "stacks": stacks, "profile": profile},
                                                       indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
