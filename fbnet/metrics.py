"""Retrieval metrics (numpy, torch-free): MAP (eq. 22), Recall@K and R@sum (eq. 23), PR curves.

Scores are an ``(images, captions)`` matrix. Image-to-text ranks the captions for each image
(rows); text-to-image ranks the images for each caption (columns). Relevance is either
*category* (same label) or *instance* (the caption belongs to the image).

Eq. (22): ``AP(q) = 1/R_q sum_k P(k) rel(k)`` over the full ranking, ``MAP = mean_q AP(q)``.
Eq. (23): ``R@sum`` is the sum of R@1, R@5 and R@10 in both directions (instance relevance).
Ties are broken by gallery order (a stable sort), as in SCAN's evaluation.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)
PR_LEVELS = np.linspace(0.0, 1.0, 11)


def _ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Each row query's relevance in its ranking's order: the one sort every metric below reads."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant.astype(bool), order, axis=1)


def _average_precision(ranked: np.ndarray) -> np.ndarray:
    rel = ranked.astype(np.float64)
    hits = rel.cumsum(axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_pos = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (hits / ranks * rel).sum(axis=1) / n_pos


def _recall_at_k(ranked: np.ndarray, ks) -> dict[int, float]:
    first = np.where(ranked.any(axis=1), ranked.argmax(axis=1), np.iinfo(np.int64).max)
    return {k: float((first < k).mean()) for k in ks}


def _pr_curve(ranked: np.ndarray, levels) -> np.ndarray:
    rel = ranked[ranked.any(axis=1)].astype(np.float64)
    hits = rel.cumsum(axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    recall = hits / rel.sum(axis=1, keepdims=True)
    # interpolated precision at r: the best precision at any rank whose recall is >= r
    best_from = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    out = np.empty((rel.shape[0], len(levels)))
    for j, r in enumerate(levels):
        first = np.argmax(recall >= r - 1e-12, axis=1)
        out[:, j] = best_from[np.arange(rel.shape[0]), first]
    return out.mean(axis=0)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP of each row query over its full ranking (eq. 22); queries with no positive get NaN."""
    return _average_precision(_ranked_relevance(scores, relevant))


def mean_average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    return float(np.nanmean(average_precision(scores, relevant)))


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks=RECALL_KS) -> dict[int, float]:
    """Fraction of row queries with at least one relevant item in their top k."""
    return _recall_at_k(_ranked_relevance(scores, relevant), ks)


def pr_curve(scores: np.ndarray, relevant: np.ndarray, levels=PR_LEVELS) -> np.ndarray:
    """Interpolated precision at each recall level, averaged over row queries."""
    return _pr_curve(_ranked_relevance(scores, relevant), levels)


def retrieval_report(scores: np.ndarray, caption_image: np.ndarray, image_labels=None,
                     caption_labels=None) -> dict:
    """All metrics for a score matrix: MAP, R@K, R@sum, PR curves, both directions.

    ``caption_image[c]`` is the index of caption ``c``'s image; labels enable category metrics.
    """
    instance = caption_image[None, :] == np.arange(scores.shape[0])[:, None]
    relevance = {"instance": instance}
    if image_labels is not None and caption_labels is not None:
        relevance["category"] = np.asarray(image_labels)[:, None] == np.asarray(caption_labels)[None, :]
    report: dict = {"images": int(scores.shape[0]), "captions": int(scores.shape[1])}
    for kind, rel in relevance.items():
        block = {}
        for direction, s, r in (("i2t", scores, rel), ("t2i", scores.T, rel.T)):
            ranked = _ranked_relevance(s, r)  # sorted once for all three metrics
            block[direction] = {
                "map": float(np.nanmean(_average_precision(ranked))),
                **{f"r@{k}": v * 100 for k, v in _recall_at_k(ranked, RECALL_KS).items()},
                "pr": _pr_curve(ranked, PR_LEVELS).tolist(),
            }
        block["map"] = (block["i2t"]["map"] + block["t2i"]["map"]) / 2
        block["rsum"] = sum(block[d][f"r@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
        report[kind] = block
    report["primary"] = "category" if "category" in report else "instance"
    return report


def chance_map(caption_image: np.ndarray, image_labels=None, caption_labels=None) -> float:
    """Expected MAP of a random ranking (about the positive rate), for context in reports."""
    rng = np.random.default_rng(0)
    scores = rng.random((len(image_labels) if image_labels is not None else caption_image.max() + 1,
                         len(caption_image)))
    rep = retrieval_report(scores, caption_image, image_labels, caption_labels)
    return rep[rep["primary"]]["map"]
