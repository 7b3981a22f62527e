"""``fbnet parity``: the same split through PyTorch and through the torch-free runtime.

The PyTorch side recomputes block features in float32 (the training cache holds float16) and
scores with the checkpoint's model; the runtime side decodes the same image files and chains the
bundle's graphs on the chosen backend. Both score matrices go through the same metrics. Parity
holds when |MAP difference| <= 0.005 (float32 backends), 0.01 (float16 engines) or 0.02 (a bundle
with INT8 graphs, ``fbnet export --int8``); the report lists every MAP and R@K change.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import load_checkpoint
from .data.manifest import load_dataset
from .evaluate import load_model
from .features import compute_features
from .metrics import RECALL_KS, retrieval_report
from .pipeline import Captions, frozen_from_checkpoint, score_split

TOLERANCE = {"float32": 0.005, "float16": 0.01, "int8": 0.02}


def top_k_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of the top-k sets of each row query, in [0, 1]."""
    k = min(k, a.shape[1])
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def run_parity(ckpt_path, bundle_path, split: str = "test", backend: str = "auto", data=None,
               limit: int | None = None) -> dict:
    from .runtime.engine.backends import select_backend
    from .runtime.engine.bundle import open_bundle
    from .runtime.engine.retriever import Retriever

    ckpt = load_checkpoint(ckpt_path)
    cfg, model, vocab, fusion = load_model(ckpt)
    dataset = load_dataset(data or ckpt["data_root"])
    items = dataset.split(split)[:limit]
    detector, encoder = frozen_from_checkpoint(cfg, ckpt)
    m = cfg.model
    feats = compute_features(items, encoder, detector, image_size=m.backbone.image_size, levels=m.levels,
                             max_boxes=m.detector.max_boxes, dtype=np.float32, desc=f"pytorch[{split}]")
    caps = Captions.from_items(items, vocab, cfg.data.max_words, dataset.has_labels)
    torch_scores = model.fuse(score_split(model, feats, caps, cfg.train.eval_chunk), fusion)

    bundle = open_bundle(bundle_path)
    retriever = Retriever(bundle, select_backend(bundle, backend))
    captions = [c for it in items for c in it.captions]
    runtime_scores = retriever.score(retriever.encode_images([it.image for it in items]),
                                     retriever.encode_texts(captions))

    args = (caps.image, caps.image_labels, caps.labels)
    ref, got = retrieval_report(torch_scores, *args), retrieval_report(runtime_scores, *args)
    primary = ref["primary"]
    quantized = bundle.manifest.quantization
    precision = "int8" if quantized else "float16" if retriever.backend.half else "float32"
    result = {
        "split": split, "images": len(items), "captions": len(captions),
        "backend": retriever.backend.name,
        "precision": f"int8 {'+'.join(quantized['graphs'])}, float32 others" if quantized else precision,
        "primary": primary,
        "pytorch": _headline(ref), "runtime": _headline(got),
        "map_diff": got[primary]["map"] - ref[primary]["map"],
        "top10_agreement_i2t": top_k_agreement(torch_scores, runtime_scores),
        "top10_agreement_t2i": top_k_agreement(torch_scores.T, runtime_scores.T),
        "max_score_diff": float(np.abs(torch_scores - runtime_scores).max()),
        "tolerance": TOLERANCE[precision],
    }
    result["passed"] = abs(result["map_diff"]) <= result["tolerance"]
    return result


def _headline(report: dict) -> dict:
    out = {}
    for kind in ("category", "instance"):
        if kind in report:
            r = report[kind]
            out[kind] = {"map": r["map"], "rsum": r["rsum"],
                         **{f"{d} r@{k}": r[d][f"r@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS}}
    return out


def format_parity(res: dict) -> str:
    lines = [f"parity on {res['split']}: {res['images']} images, {res['captions']} captions; "
             f"runtime backend {res['backend']} ({res['precision']})",
             f"{'metric':26s} {'pytorch':>10s} {'runtime':>10s} {'diff':>10s}"]
    for kind, values in res["pytorch"].items():
        for name, v in values.items():
            w = res["runtime"][kind][name]
            lines.append(f"{kind + ' ' + name:26s} {v:10.4f} {w:10.4f} {w - v:+10.4f}")
    lines += [f"top-10 agreement: image->text {res['top10_agreement_i2t']:.4f}, "
              f"text->image {res['top10_agreement_t2i']:.4f}",
              f"largest score difference: {res['max_score_diff']:.2e}",
              f"{res['primary']} MAP difference {res['map_diff']:+.5f} (tolerance {res['tolerance']}): "
              + ("PASS" if res["passed"] else "FAIL")]
    return "\n".join(lines)
