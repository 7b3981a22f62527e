"""Every model on the same Flickr8k features: dev R@1/5/10 both ways, R@sum, epochs, seconds per
training epoch, two-stage query latency at 10,000 items and bytes per gallery item.

    python benchmarks/models.py                    # each config's recipe, to its early stop
    python benchmarks/models.py --epochs 2         # the same short budget for every model
    python benchmarks/models.py --run fbnet=runs/flickr8k --run rgf=runs/rgf   # reuse finished runs

Each model trains from its config (``configs/flickr8k.yaml`` for FB-Net, ``configs/<name>.yaml``
for the others: the same feature cache, backbone, detector and word vectors; each its own loss,
learning rate and epoch budget with early stopping) into ``runs/compare/<name>`` (an interrupted
run resumes; ``--run NAME=DIR`` takes a finished run of that config instead), is evaluated by ``fbnet train`` on all 5,000 dev captions (instance R@K: a caption's
own image), exported, and timed in the torch-free runtime: a text query (encode + two-stage search,
shortlist 100) against a synthetic float16 gallery of 10,000 items of the bundle's shapes. Bytes
per item are that gallery's arrays on disk (float16, padded: F-Net's empty box slots and a word
key's ``max_words`` slots included). Needs the Flickr8k data (README "Flickr8k"); nothing else may
run beside it. Writes "## Related models" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fbnet.runtime.engine.backends import select_backend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.runtime.search.searcher import Searcher

from common import ROOT, machine, timeit, write_section
from galleries import synthetic_gallery

MODELS = {"fbnet": "configs/flickr8k.yaml", "scan": "configs/scan.yaml", "dsrln": "configs/dsrln.yaml",
          "rgf": "configs/rgf.yaml", "sfe": "configs/sfe.yaml"}
SOURCES = {"fbnet": "Xu et al. 2023 (this project)", "scan": "Lee et al. 2018 (t-i, LSE)",
           "dsrln": "Wu et al. 2025 (reconstruction)", "rgf": "Wu et al. 2022 (reconstruction)",
           "sfe": "Wang et al. 2025 (reconstruction)"}
QUERY = "a black dog is running through the grass"


def fbnet_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fbnet.cli", *args], cwd=ROOT, check=True)


def train_and_export(name: str, config: str, data: Path, run: Path, epochs: int | None) -> Path:
    if not (run / "metrics-val.json").is_file():  # not a finished run: train (or resume) it
        resume = ["--resume"] if (run / "last.pt").is_file() else ["--data", str(data), "--config", config]
        fbnet_cli("train", *resume, "--out", str(run), *(["--epochs", str(epochs)] if epochs else []))
    if not (run / "bundle" / "manifest.json").is_file():
        fbnet_cli("export", str(run / "best.pt"), "--out", str(run / "bundle"))
    return run


def row(name: str, run: Path, work: Path, repeats: int) -> dict:
    metrics = json.loads((run / "metrics-val.json").read_text())["instance"]
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    records = [e for e in epochs if e.get("event") == "epoch"]
    seconds = [e["seconds"] for e in records]
    kept = max(records, key=lambda e: e["val_map"])["epoch"]  # best.pt: the first epoch of the best MAP
    bundle = open_bundle(run / "bundle")
    retriever = Retriever(bundle, select_backend(bundle, "onnxruntime"))
    gallery = synthetic_gallery(bundle, 10_000, work / "galleries" / name, dtype="float16")  # the table's bytes
    searcher = Searcher(retriever, gallery.image_features, gallery.text_features, 100)
    t = timeit(lambda: searcher.images_for(retriever.encode_texts([QUERY]), 10, 100), repeats, 3)
    size = lambda side: sum(p.stat().st_size for p in (gallery.root / side).glob("*.npy"))  # noqa: E731
    return {"name": name, "r": {d: [metrics[d][f"r@{k}"] for k in (1, 5, 10)] for d in ("i2t", "t2i")},
            "rsum": metrics["rsum"], "epoch_s": statistics.median(seconds), "epochs": len(seconds), "kept": kept,
            "minutes": sum(seconds) / 60,
            "p50": t["median"], "p95": t["p95"], "image_kb": size("images") / 10_000 / 1e3,
            "caption_kb": size("texts") / 10_000 / 1e3}


def section(rows: list[dict], command: str, epochs: int | None) -> str:
    budget = (f"**{epochs} epochs** each" if epochs else
              "each config's recipe (loss, learning rate, batch) trained to its early stop or epoch budget")
    lines = ["## Related models", "",
             f"`{command}` on {machine()}. Every model: the Flickr8k recipe's cached features (MobileNetV2 "
             f"blocks, YOLOv3-tiny boxes, word2vec), seed 0, {budget}; dev split, all 5,000 captions, "
             "instance R@K. Seconds per epoch include the epoch's validation (1,000 x 1,000 pairs); minutes "
             "are the run's epochs added up, and `epochs (kept)` the epochs trained and the one kept. Latency: "
             "a text query, encoded and searched two-stage (first stage, then the model's own score on the "
             "100 best), against 10,000 synthetic items of the bundle's shapes, ONNX Runtime, one warm "
             "process. Bytes per item: that gallery's float16 arrays (padded).", "",
             "| model | source | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | R@sum | epochs (kept) | s/epoch | minutes "
             "| text p50 ms | p95 ms | KB/image | KB/caption |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for r in rows:
        recalls = " | ".join(f"{v:.1f}" for d in ("i2t", "t2i") for v in r["r"][d])
        lines.append(f"| {r['name']} | {SOURCES[r['name']]} | {recalls} | {r['rsum']:.1f} | {r['epochs']} ({r['kept']}) | "
                     f"{r['epoch_s']:.0f} | {r['minutes']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['image_kb']:.1f} | {r['caption_kb']:.1f} |")
    lines += ["", "Where the reconstructions may differ from the published models: the sources for DSRLN, RGF "
              "and SFE are abstracts (no equations); each module's docstring (`fbnet/models/<name>.py`) marks "
              "what is reconstructed. All models here see at most 9 YOLOv3-tiny boxes and a 3 x 3 grid of "
              "RoIAligned MobileNetV2 cells, not 36 bottom-up-attention regions of a Visual Genome detector and "
              "a ResNeXt grid, so absolute figures are far below the papers'.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, help="the same budget for every model (default: each config's own)")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                    help="a finished run of MODELS[NAME]'s config to use instead of training one")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "flickr8k")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "compare")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    names = args.models.split(",")
    given = dict(r.split("=", 1) for r in args.run)
    runs = {n: train_and_export(n, MODELS[n], args.data, Path(given.get(n, args.work / n)), args.epochs)
            for n in names}
    rows = [row(n, runs[n], args.work, args.repeats) for n in names]
    text = section(rows, "python benchmarks/models.py " + " ".join(sys.argv[1:]), args.epochs)
    print(text)
    write_section(args.out, "## Related models", text)


if __name__ == "__main__":
    main()
