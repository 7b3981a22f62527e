"""``fbnet parity``: the same split through PyTorch and through the torch-free runtime.

The PyTorch side recomputes block features in float32 (the training cache holds float16) and
scores with the checkpoint's model; the runtime side decodes the same image files and chains the
bundle's graphs on the chosen backend. Both score matrices go through the same metrics. Parity
holds when |MAP difference| <= 0.005 (float32 backends), 0.01 (float16 engines) or 0.02 (a bundle
with INT8 graphs, ``fbnet export --int8``); the report lists every MAP and R@K change. An
ensemble file and its ensemble bundle are compared the same way, each side scoring
``sum_m w_m S_m``.
"""

from __future__ import annotations

import numpy as np

from .checkpoint import as_exported, load_checkpoint
from .data.manifest import load_dataset
from .ensemble import EnsembleError, combine, is_ensemble, load_ensemble, member_checkpoints
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


def pytorch_scores(ckpt: dict, items: list, has_labels: bool, split: str) -> tuple[np.ndarray, Captions]:
    """A checkpoint's fused scores ``(I, C)`` for ``items``, from float32 block features (eq. 7)."""
    cfg, model, vocab, fusion = load_model(ckpt)
    detector, encoder = frozen_from_checkpoint(cfg, ckpt)
    m = cfg.model
    feats = compute_features(items, encoder, detector, image_size=m.backbone.image_size, levels=m.levels,
                             max_boxes=m.detector.max_boxes, dtype=np.float32, desc=f"pytorch[{split}]")
    caps = Captions.from_items(items, vocab, cfg.data.max_words, has_labels)
    return model.fuse(score_split(model, feats, caps, cfg.train.eval_chunk), fusion), caps


def run_parity(source, bundle_path, split: str = "test", backend: str = "auto", data=None,
               limit: int | None = None) -> dict:
    """``source``: a checkpoint and its bundle, or an ensemble file and its ensemble bundle (scores
    ``sum_m w_m S_m`` on both sides)."""
    from .runtime.engine.ensemble import open_retriever

    if is_ensemble(source):
        ensemble = load_ensemble(source)
        members, weights = member_checkpoints(ensemble), [m.weight for m in ensemble.members]
    else:
        members, weights = [load_checkpoint(source)], [1.0]
    retriever = open_retriever(bundle_path, backend)
    _check_members(retriever, weights, bundle_path, source)
    dataset = load_dataset(data or members[0]["data_root"])
    items = dataset.split(split)[:limit]
    bundles = getattr(retriever.bundle, "members", [retriever.bundle])
    # a bundle exported with --detector-size or --detector runs that detector: so does PyTorch here
    parts = [pytorch_scores(as_exported(ckpt, b.manifest.source_checkpoint), items, dataset.has_labels, split)
             for ckpt, b in zip(members, bundles)]
    torch_scores, caps = combine([p[0] for p in parts], weights), parts[0][1]
    captions = [c for it in items for c in it.captions]
    runtime_scores = retriever.score(retriever.encode_images([it.image for it in items]),
                                     retriever.encode_texts(captions))

    args = (caps.image, caps.image_labels, caps.labels)
    ref, got = retrieval_report(torch_scores, *args), retrieval_report(runtime_scores, *args)
    primary = ref["primary"]
    quantized = next((b.manifest.quantization for b in bundles if b.manifest.quantization), None)
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


def _check_members(retriever, weights: list[float], bundle_path, source) -> None:
    """An ensemble bundle must hold as many members, with the same weights, as the ensemble file."""
    got = getattr(retriever, "weights", [1.0])
    if len(got) != len(weights) or not np.allclose(got, weights):
        raise EnsembleError(f"{bundle_path}: {len(got)} member(s) weighted {got}, {source}: {len(weights)} "
                            f"weighted {weights}; not its bundle (fbnet export {source} --out BUNDLE makes it)")


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
