"""The served ensemble on Flickr8k dev: what the runtime returns for an ensemble bundle, against its
members, with two-stage search and exhaustively; the two first stages an ensemble can use; cost.

    python benchmarks/ensemble.py --ensemble runs/ensemble.yaml [--bundle runs/ensemble-bundle]

Exports the ensemble bundle when it is missing, indexes the 1,000 dev images and 5,000 captions with
it (one gallery per member), then:

* every member's and the ensemble's exhaustive runtime scores (1,000 x 5,000: ``Retriever.score``
  of each member, summed with the ensemble's weights, as the runtime re-ranks);
* two-stage search at K = ``--shortlist`` through the runtime's own ``Searcher`` over the ensemble
  gallery (every dev image and caption a query): the served figure;
* the first stage: the first member's pooled vectors (what the runtime uses) against the members'
  concatenated pooled vectors scaled by sqrt(w_m) (inner product ``sum_m w_m cos_m``), each
  re-ranked by the ensemble's exhaustive scores at K;
* a text and an image query's p50 on this 1,000-image / 5,000-caption gallery, the ensemble
  against its first member, and the gallery's float32 bytes per image;
* the same at ``--items`` (10,000) images and captions, in every store of ``--stores`` (float32 and
  sq4): synthetic features of each member's shapes (``galleries.synthetic_gallery``, coded as
  ``index --store`` codes them), the queries encoded from a real photo and caption.

The table goes to BENCHMARKS.md, "Served ensemble (Flickr8k dev)".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fbnet.data.manifest import load_dataset
from fbnet.ensemble import load_ensemble, member_checkpoints
from fbnet.export.ensemble import export_ensemble_bundle
from fbnet.metrics import recall_at_k
from fbnet.preprocess import load_image
from fbnet.runtime.engine.backends import OnnxRuntimeBackend
from fbnet.runtime.engine.ensemble import EnsembleRetriever, combine, open_ensemble_bundle
from fbnet.runtime.engine.retriever import Retriever
from fbnet.runtime.gallery import open_gallery
from fbnet.runtime.gallery.build import build_gallery
from fbnet.runtime.gallery.ensemble import build_ensemble_gallery
from fbnet.runtime.gallery.first_stage import pooled_images, pooled_texts
from fbnet.runtime.search.searcher import Searcher

from common import ROOT, machine, shown, timeit, write_section
from galleries import store_copy, synthetic_gallery
from retrieval import recall_cells, recall_percent, runtime_recall, two_stage_recall

HEADING = "## Served ensemble (Flickr8k dev)"


def recall_row(label: str, k, r_i: dict, r_t: dict, recovered: str = "") -> str:
    """A table row from R@K of both directions (fractions, as ``recall_at_k`` gives them)."""
    r = recall_percent(r_i, r_t)
    i2t, t2i = recall_cells(r)
    return f"| {label} | {k} | {i2t} | {t2i} | {r['rsum']:.1f} | {recovered} |"


def exhaustive_row(label: str, scores: np.ndarray, relevant: np.ndarray) -> str:
    return recall_row(label, "all", recall_at_k(scores, relevant), recall_at_k(scores.T, relevant.T))


def cost_table(lead, retriever, gallery, gallery_dir: Path, names: list[str], photo, k: int, repeats: int,
               store: str) -> list[str]:
    """Text and image query p50 (two-stage, encoding included) and bytes per image, the first member
    alone against the ensemble."""
    rows = cost_header(store)
    member_bytes = gallery_bytes(gallery_dir, names)
    n = len(gallery.images)
    for label, r, gal, size in (("first member alone", lead, gallery.members[0], member_bytes[0]),
                                ("ensemble", retriever, gallery, sum(member_bytes))):
        rows.append(cost_row(label, *query_times(r, gal, photo, k, repeats), size / n))
    return rows


def cost_header(store: str) -> list[str]:
    return [f"| search with | text query p50 ms | image query p50 ms | {store} gallery KB per image |",
            "| --- | ---: | ---: | ---: |"]


def gallery_bytes(gallery_dir: Path, names: list[str]) -> list[int]:
    """Bytes of each member gallery's image store."""
    return [sum(f.stat().st_size for f in (gallery_dir / name / "images").iterdir()) for name in names]


def query_times(retriever, gallery, photo, k: int, repeats: int) -> tuple[float, float]:
    """A text and an image query's p50 in ms through ``retriever`` over ``gallery`` (two-stage,
    K = ``k``, encoding included)."""
    searcher = Searcher.for_gallery(retriever, gallery, k)
    text = timeit(lambda: searcher.images_for(retriever.encode_texts(["a dog runs through the grass"]), 10), repeats, 3)
    image = timeit(lambda: searcher.texts_for(retriever.encode_canvases(photo[None]), 10), repeats, 3)
    return text["median"], image["median"]


def cost_row(label: str, text_ms: float, image_ms: float, image_bytes: float) -> str:
    row = f"| {label} | {text_ms:.1f} | {image_ms:.1f} | {image_bytes / 1024:.1f} |"
    print(row, flush=True)
    return row


def synthetic_ensemble(bundle, n: int, work: Path, store: str):
    """An ensemble gallery of ``n`` synthetic images and captions in ``store``: each member's float32
    gallery (``galleries.synthetic_gallery``), linked, or coded into ``store``."""
    def member(member_bundle, folder: Path) -> None:
        plain = synthetic_gallery(member_bundle, n, work / folder.name).root
        if store == "float32":
            folder.symlink_to(plain.resolve(), target_is_directory=True)
        else:
            store_copy(plain, folder, member_bundle.keys, store)

    root = build_ensemble_gallery(bundle, work / f"ensemble-{n}-{store}", member)
    return open_gallery(root, bundle), root


def ensemble_args(description: str, work: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments an ensemble benchmark takes (its own are added by the caller)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--ensemble", type=Path, default=ROOT / "runs" / "ensemble.yaml")
    ap.add_argument("--bundle", type=Path, help="default: <ensemble file's folder>/ensemble-bundle")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / work, help="galleries go here")
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--items", type=int, default=10_000, help="images and captions of the synthetic cost galleries")
    ap.add_argument("--stores", default="float32,sq4", help="stores of the synthetic cost galleries")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    return ap


def open_ensemble_args(args):
    """``(ensemble file, ensemble bundle, member retrievers on ONNX Runtime, the first member's
    dataset)`` from :func:`ensemble_args`; the bundle is exported first when it is missing."""
    if not args.ensemble.is_file():
        sys.exit(f"{args.ensemble}: no ensemble file; make one with `fbnet ensemble A.pt B.pt --out FILE`")
    ensemble = load_ensemble(args.ensemble)
    bundle_dir = args.bundle or args.ensemble.parent / "ensemble-bundle"
    if not bundle_dir.is_dir():
        export_ensemble_bundle(args.ensemble, bundle_dir)
    bundle = open_ensemble_bundle(bundle_dir)
    members = [Retriever(b, OnnxRuntimeBackend(b)) for b in bundle.members]
    return ensemble, bundle, members, load_dataset(member_checkpoints(ensemble)[0]["data_root"])


def main() -> None:
    ap = ensemble_args(__doc__.split("\n\n")[0], "bench-ensemble", 30)
    args = ap.parse_args()
    ensemble, bundle, members, dataset = open_ensemble_args(args)
    retriever = EnsembleRetriever(bundle, members)
    items = dataset.split("val")
    images = [it.image for it in items]
    captions = [c for it in items for c in it.captions]
    owner = np.repeat(np.arange(len(items)), [len(it.captions) for it in items])
    gallery_dir = args.work / "dev-gallery"
    if not gallery_dir.is_dir():
        build_ensemble_gallery(bundle, gallery_dir, lambda b, folder: build_gallery(
            Retriever(b, OnnxRuntimeBackend(b)), images, captions, folder))
    g = open_gallery(gallery_dir, bundle)
    relevant = owner[None, :] == np.arange(len(items))[:, None]

    weights = bundle.weights
    parts = [r.score(m.image_features, m.text_features) for r, m in zip(members, g.members)]
    fused = combine(parts, weights)
    lead = pooled_images(g.members[0].image_features) @ pooled_texts(g.members[0].text_features).T
    concat = combine([pooled_images(m.image_features) @ pooled_texts(m.text_features).T for m in g.members], weights)
    lines = [HEADING, "",
             f"`python benchmarks/ensemble.py --ensemble {shown(args.ensemble)}`"
             f" ({machine()}): the ensemble bundle's dev gallery ({len(images):,} images, {len(captions):,} captions; "
             "one gallery per member), scored by the runtime (ONNX Runtime). Members: "
             + "; ".join(f"{i}: `{m.checkpoint}` weight {m.weight:g}" for i, m in enumerate(ensemble.members)) + ".",
             "",
             "| search | K | image->text R@1 / R@5 / R@10 | text->image R@1 / R@5 / R@10 | R@sum | top-10 recovered i2t / t2i |",
             "| --- | ---: | --- | --- | ---: | --- |"]
    for i, s in enumerate(parts):
        lines.append(exhaustive_row(f"member {i} alone, exhaustive", s, relevant))
    lines.append(exhaustive_row("**ensemble, exhaustive**", fused, relevant))
    k = args.shortlist
    for label, first in (("first member's pooled vectors (served)", lead), ("members' pooled vectors concatenated", concat)):
        r_i, rec_i = two_stage_recall(first, fused, relevant, k)
        r_t, rec_t = two_stage_recall(first.T, fused.T, relevant.T, k)
        lines.append(recall_row(f"ensemble two-stage, first stage: {label}", k, r_i, r_t, f"{rec_i:.3f} / {rec_t:.3f}"))
    served = runtime_recall(retriever, g, owner, k)
    i2t, t2i = recall_cells(served)
    lines.append(f"| **ensemble two-stage through `Searcher` (what the server answers)** | {k} | {i2t} | {t2i} | "
                 f"{served['rsum']:.1f} | |")

    photo = load_image(images[0], bundle.canvas)
    lines += ["", f"Query cost on this gallery (two-stage, K = {k}, p50 of {args.repeats}, encoding included):", ""]
    lines += cost_table(members[0], retriever, g, gallery_dir, g.meta.members, photo, k, args.repeats, "float32")
    for store in args.stores.split(","):
        big, big_dir = synthetic_ensemble(bundle, args.items, args.work / "synthetic", store)
        lines += ["", f"At {args.items:,} images and captions, `{store}` store (synthetic features of the members' "
                  f"shapes; two-stage, K = {k}, p50 of {args.repeats}, encoding included):", ""]
        lines += cost_table(members[0], retriever, big, big_dir, big.meta.members, photo, k, args.repeats, store)
    section = "\n".join(lines + [""])
    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
