"""INT8 graphs for CPU serving: image-query latency and accuracy, float32 bundle against its
``fbnet export --int8`` copy.

    python benchmarks/int8.py                         # default model: runs/synth-seed0

Latency: decode, detector and image encoder for single images of the dataset's report split, and
a whole two-stage image query (top 5 of 100) against a 10,000-item synthetic float32 gallery of
each bundle. Accuracy: ``fbnet parity`` of each bundle against PyTorch float32 on the report
split. Writes the "INT8 graphs" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fbnet.checkpoint import load_checkpoint
from fbnet.data.manifest import load_dataset
from fbnet.parity import run_parity
from fbnet.preprocess import load_image
from fbnet.runtime.engine.backends import select_backend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.runtime.serving.service import ImageQuery, SearchService

from common import ROOT, machine, shown, timeit, write_section
from galleries import synthetic_gallery


def latency(bundle_dir: Path, paths: list[Path], work: Path, items: int, repeats: int) -> dict:
    bundle = open_bundle(bundle_dir)
    retriever = Retriever(bundle, select_backend(bundle, "onnxruntime"))
    canvases = [load_image(p, bundle.canvas) for p in paths]
    feeds = [retriever.image_encoder_feeds(c[None]) for c in canvases]
    it = iter(range(10 ** 9))

    def pick(seq):
        return seq[next(it) % len(seq)]

    gallery = synthetic_gallery(bundle, items, work / bundle_dir.name)
    service = SearchService(retriever, gallery, 100)
    service.warm()
    return {
        "decode": timeit(lambda: load_image(pick(paths), bundle.canvas), repeats, 3)["median"],
        "detector": timeit(lambda: retriever.detect(pick(canvases)), repeats, 3)["median"],
        "image encoder": timeit(lambda: retriever.backend.run("image_encoder", pick(feeds)), repeats, 3)["median"],
        "two-stage image query": timeit(lambda: service.search_images([ImageQuery(pick(canvases), 5)]),
                                        repeats, 3)["median"],
    }


def int8_copy(float_dir: Path, int8_dir: Path, graphs: str = "detector") -> Path:
    """``int8_dir``: a copy of the bundle ``float_dir`` quantized by ``fbnet export --int8`` (kept
    when a finished one is there)."""
    if not (int8_dir / "manifest.json").is_file():
        shutil.rmtree(int8_dir, ignore_errors=True)
        shutil.copytree(float_dir, int8_dir)
        subprocess.run([sys.executable, "-m", "fbnet.cli", "export", str(int8_dir), "--int8", "--int8-graphs", graphs],
                       check=True)
    return int8_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "synth-seed0", help="a run with best.pt and bundle/")
    ap.add_argument("--int8-graphs", default="detector", help="graphs to quantize (`fbnet export --int8-graphs`)")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-int8")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    ckpt_path, float_dir = args.run / "best.pt", args.run / "bundle"
    int8_dir = args.run / f"bundle-int8-{args.int8_graphs.replace(',', '+')}"
    if not ckpt_path.is_file():
        sys.exit(f"{ckpt_path}: no checkpoint; run `fbnet train` first (README, Quick start)")
    if not (float_dir / "manifest.json").is_file():
        subprocess.run(["fbnet", "export", str(ckpt_path), "--out", str(float_dir)], check=True)
    int8_copy(float_dir, int8_dir, args.int8_graphs)
    dataset = load_dataset(load_checkpoint(ckpt_path)["data_root"])
    split = dataset.report_split
    paths = [Path(i.image) for i in dataset.split(split)][:50]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    lat = {name: latency(d, paths, args.work, args.items, args.repeats) for name, d in
           (("float32", float_dir), ("int8", int8_dir))}
    par = {name: run_parity(ckpt_path, d, split, "onnxruntime") for name, d in
           (("float32", float_dir), ("int8", int8_dir))}
    print(f"measured in {time.time() - t0:.0f} s")
    manifest = open_bundle(int8_dir).manifest.quantization
    lines = ["## INT8 graphs", "",
             f"`python benchmarks/int8.py --run {shown(args.run)}"
             f" --int8-graphs {args.int8_graphs}` ({time.strftime('%Y-%m-%d')}; {machine()}). The run's "
             f"bundle and its `fbnet export --int8` copy: {', '.join(manifest['graphs'])} quantized (QDQ, "
             f"{manifest['weights']} weights, {manifest['activations']} activations, "
             f"{manifest['calibration']['method']} calibration on {manifest['calibration']['images']} "
             f"training images); median ms of single images of the "
             f"{split} split, ONNX Runtime on the CPU; the query runs against {args.items:,} synthetic "
             "float32 gallery items of each bundle.", "",
             "| stage | float32 ms | int8 ms | speed-up |", "| --- | ---: | ---: | ---: |"]
    for stage in lat["float32"]:
        f, q = lat["float32"][stage], lat["int8"][stage]
        lines.append(f"| {stage} | {f:.2f} | {q:.2f} | {f / q:.2f}x |")
    lines += ["", f"Accuracy against PyTorch float32 (`fbnet parity`, {split} split, "
              f"{par['int8']['images']} images, {par['int8']['captions']} captions):", "",
              f"| bundle | {par['int8']['primary']} MAP | instance R@sum | top-10 agreement i2t / t2i |",
              "| --- | ---: | ---: | --- |"]
    primary, ref = par["int8"]["primary"], par["float32"]["pytorch"]
    lines.append(f"| PyTorch float32 | {ref[primary]['map']:.4f} | {ref['instance']['rsum']:.1f} | |")
    for name, r in par.items():
        got = r["runtime"]
        lines.append(f"| {name} bundle | {got[primary]['map']:.4f} | {got['instance']['rsum']:.1f} | "
                     f"{r['top10_agreement_i2t']:.3f} / {r['top10_agreement_t2i']:.3f} |")
    drop = par["int8"]["runtime"]["instance"]["rsum"] - par["float32"]["runtime"]["instance"]["rsum"]
    lines += ["", f"INT8 changes instance R@sum by {drop:+.1f} against the float32 bundle on this split."]
    write_section(args.out, "## INT8 graphs", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
