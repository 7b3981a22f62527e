"""The image query's detector: YOLOv3-tiny's input size (``model.detector.input_size``), its
INT8 copy and distilled heads on MobileNetV2's maps, against today's 416 x 416, with what each
costs in dev R@sum.

    python benchmarks/detector.py --checkpoint runs/flickr8k/best.pt [--sizes 416,320,224]
        [--distilled runs/mobilenet-head.pt] [--retrained runs/flickr8k-head/best.pt]

For every size, the checkpoint is exported with ``fbnet export --detector-size SIZE``
(``<work>/<size>/bundle``; ``--int8`` adds its ``fbnet export --int8`` copy, the detector
quantized); every ``--distilled`` file (``fbnet distill-detector``) with ``fbnet export
--detector FILE`` (``<work>/<file stem>/bundle``); every ``--retrained`` checkpoint (a model trained
on another detector's boxes, such as the head's) as it was trained (``<work>/retrained-<run>/bundle``).
Each is measured:

* accuracy: the 1,000 dev images indexed with that bundle (the 5,000 dev captions beside them) and
  scored exhaustively by the runtime (``Retriever.score``, what two-stage re-ranks with), instance
  R@sum; the checkpoint's weights were trained on the boxes of the 416 detector, so this is the
  cost of serving other boxes *without retraining*, and a ``--retrained`` row is the cost with it;
* box agreement on the first 200 dev photos: boxes found per photo, and the share of the 416
  detector's boxes that a box of this size overlaps at IoU >= 0.5;
* latency: decode, detector and image encoder of single dev photos, and the whole two-stage image
  query (top 5 of a shortlist of 100) against 10,000 synthetic float32 items, p50.

Dev R@sum is kept in ``<work>/<size>/<bundle>-accuracy.json`` (it does not depend on what else
runs), so a second run re-measures only the box agreement and the latency, which must run alone. Writes "## Image query:
detector input size" to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fbnet.atomic import atomic_write_text
from fbnet.checkpoint import load_checkpoint
from fbnet.data.manifest import load_dataset
from fbnet.distill import agreement
from fbnet.metrics import recall_at_k
from fbnet.preprocess import load_image
from fbnet.runtime.engine.backends import OnnxRuntimeBackend
from fbnet.runtime.engine.bundle import open_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.runtime.gallery import open_gallery
from fbnet.runtime.gallery.build import build_gallery

from common import ROOT, machine, write_section
from int8 import int8_copy, latency
from retrieval import recall_percent

HEADING = "## Image query: detector input size"
AGREEMENT_PHOTOS = 200


def variant_bundle(checkpoint: Path, variant: tuple, work: Path) -> Path:
    """The bundle of ``checkpoint`` serving ``variant``: ``(size, int8)``, YOLOv3-tiny at ``size``
    (quantized if ``int8``); ``(file, False)``, the distilled detector in ``file``; or
    ``(Path, False)``, that checkpoint as it was trained (``--retrained``)."""
    what, int8 = variant
    if isinstance(what, Path):
        checkpoint, served, folder = what, [], work / f"retrained-{what.parent.name}"
    elif isinstance(what, str):
        served, folder = ["--detector", what], work / Path(what).stem
    else:
        served, folder = ["--detector-size", str(what)], work / str(what)
    bundle = folder / "bundle"
    if not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "fbnet.cli", "export", str(checkpoint), "--out", str(bundle), *served],
                       check=True)
    if not int8:
        return bundle
    return int8_copy(bundle, folder / "bundle-int8")


def label(variant: tuple) -> str:
    what, int8 = variant
    if isinstance(what, Path):
        detector = load_checkpoint(what)["config"]["model"]["detector"]["name"]
        return f"`{what}`, retrained on its detector's boxes ({detector})"
    if isinstance(what, str):
        return f"distilled head on MobileNetV2 (`{Path(what).name}`)"
    return f"{what} x {what}{', INT8' if int8 else ''}"


def dev_rsum(bundle_dir: Path, images: list[Path], captions: list[str], owner: np.ndarray) -> dict:
    """Instance R@K of the runtime's exhaustive scores over the dev gallery this bundle indexes."""
    bundle = open_bundle(bundle_dir)
    retriever = Retriever(bundle, OnnxRuntimeBackend(bundle))
    folder = bundle_dir.parent / f"{bundle_dir.name}-dev-gallery"
    if not (folder / "gallery.json").is_file():
        build_gallery(retriever, images, captions, folder)
    g = open_gallery(folder, bundle)
    scores = retriever.score(g.image_features, g.text_features)
    relevant = owner[None, :] == np.arange(len(images))[:, None]
    r = recall_percent(recall_at_k(scores, relevant), recall_at_k(scores.T, relevant.T))
    return {**r, "boxes": float(g.image_features.fg_mask.sum(axis=1).mean())}


def found_boxes(bundle_dir: Path, canvases: list[np.ndarray]) -> list[np.ndarray]:
    bundle = open_bundle(bundle_dir)
    retriever = Retriever(bundle, OnnxRuntimeBackend(bundle))
    out = []
    for canvas in canvases:
        boxes, scores = retriever.detect(canvas)
        out.append(boxes[scores > 0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "flickr8k" / "best.pt")
    ap.add_argument("--sizes", default="416,320,224", help="detector input sizes (multiples of 32; 416 first)")
    ap.add_argument("--int8", default="416,224", help="sizes that also get an INT8 detector ('' for none)")
    ap.add_argument("--distilled", default="", help="comma-separated detector files of fbnet distill-detector")
    ap.add_argument("--retrained", default="",
                    help="comma-separated checkpoints trained on another detector's boxes, served as trained")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-detector")
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--skip-latency", action="store_true", help="accuracy only (it may run beside other jobs)")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--heading", default=HEADING, help="the BENCHMARKS.md section to write")
    args = ap.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"{args.checkpoint}: no checkpoint; train one first (README, Flickr8k)")
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = [(s, False) for s in sizes] + [(int(s), True) for s in args.int8.split(",") if s] + \
        [(str(Path(f).resolve()), False) for f in args.distilled.split(",") if f] + \
        [(Path(f), False) for f in args.retrained.split(",") if f]
    dataset = load_dataset(load_checkpoint(args.checkpoint)["data_root"])
    items = dataset.split("val")
    images = [Path(it.image) for it in items]
    captions = [c for it in items for c in it.captions]
    owner = np.repeat(np.arange(len(items)), [len(it.captions) for it in items])
    bundles = {v: variant_bundle(args.checkpoint, v, args.work) for v in variants}

    results = {}
    canvases = [load_image(p, 224) for p in images[:AGREEMENT_PHOTOS]]
    reference = found_boxes(bundles[variants[0]], canvases)  # the first variant's boxes (416, float32)
    for v, bundle_dir in bundles.items():
        saved = bundle_dir.parent / f"{bundle_dir.name}-accuracy.json"
        if not saved.is_file():
            atomic_write_text(saved, json.dumps(dev_rsum(bundle_dir, images, captions, owner)))
        found = found_boxes(bundle_dir, canvases)
        results[v] = {**json.loads(saved.read_text()), "agreement": agreement(reference, found)}
        print(v, results[v], flush=True)
    if args.skip_latency:
        return
    for v, bundle_dir in bundles.items():
        results[v].update(latency(bundle_dir, images[:50], args.work / "galleries", args.items, args.repeats))
        print(v, results[v], flush=True)

    base = results[variants[0]]
    lines = [args.heading, "",
             f"`python benchmarks/detector.py --checkpoint {args.checkpoint} --sizes {args.sizes} "
             f"--int8 {args.int8 or repr('')}"
             f"{' --distilled ' + args.distilled if args.distilled else ''}"
             f"{' --retrained ' + args.retrained if args.retrained else ''} --repeats {args.repeats}` "
             f"({machine()}). The recipe's checkpoint exported with YOLOv3-tiny at each input size "
             "(`fbnet export --detector-size`; the Flickr8k canvas is 224 x 224), where marked with its detector "
             "quantized (`fbnet export --int8`, minmax calibration), and with a distilled detector head on "
             "MobileNetV2's own maps (`fbnet distill-detector`, then `fbnet export --detector`). "
             "Dev R@sum: the 1,000 dev images indexed "
             "with each bundle and all 5,000 captions, scored exhaustively by the runtime; the weights were "
             "trained on the 416 detector's boxes and are not retrained, except in a row marked retrained (a "
             "checkpoint trained on its own detector's boxes, served as trained). Box agreement: the first "
             f"{AGREEMENT_PHOTOS} dev photos, the share of the 416 detector's boxes that a box of the variant "
             "overlaps at IoU >= 0.5. "
             f"Latency: p50 of single dev photos; the query searches {args.items:,} synthetic float32 items "
             "two-stage (K = 100), ONNX Runtime on the CPU, one warm process.", "",
             "| detector | decode ms | detector ms | image encoder ms | two-stage image query ms | boxes / photo "
             "| box agreement | dev R@sum | vs 416 float32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in results.items():
        lines.append(f"| {label(v)} | {r['decode']:.2f} | {r['detector']:.2f} | "
                     f"{r['image encoder']:.2f} | {r['two-stage image query']:.1f} | {r['boxes']:.2f} | "
                     f"{r['agreement']:.3f} | {r['rsum']:.1f} | {r['rsum'] - base['rsum']:+.1f} |")
    section = "\n".join(lines + [""])
    write_section(args.out, args.heading, section)
    print(section)


if __name__ == "__main__":
    main()
