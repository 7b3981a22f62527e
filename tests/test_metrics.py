import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from fbnet.metrics import PR_LEVELS, average_precision, pr_curve, recall_at_k, retrieval_report


def test_average_precision_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.random((20, 50))
    rel = rng.random((20, 50)) < 0.2
    rel[:, 0] = True
    ours = average_precision(scores, rel)
    ref = [average_precision_score(rel[i], scores[i]) for i in range(20)]
    assert np.allclose(ours, ref)


def test_pr_curve_matches_sklearn_interpolated():
    rng = np.random.default_rng(1)
    scores = rng.random((10, 40))
    rel = rng.random((10, 40)) < 0.3
    rel[:, 0] = True
    ref = []
    for i in range(10):
        p, r, _ = precision_recall_curve(rel[i], scores[i])
        p, r = p[:-1], r[:-1]  # drop sklearn's conventional (recall 0, precision 1) end point
        ref.append([p[r >= level - 1e-12].max() for level in PR_LEVELS])
    assert np.allclose(pr_curve(scores, rel), np.mean(ref, axis=0))


def test_recall_at_k():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    rel = np.array([[False, False, True], [False, False, True]])
    assert recall_at_k(scores, rel, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_report_has_both_directions_and_rsum():
    rng = np.random.default_rng(2)
    scores = rng.random((4, 8))
    rep = retrieval_report(scores, np.repeat(np.arange(4), 2), np.array([0, 1, 0, 1]),
                           np.repeat([0, 1, 0, 1], 2))
    assert rep["primary"] == "category"
    inst = rep["instance"]
    assert inst["rsum"] == sum(inst[d][f"r@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    perfect = retrieval_report(np.repeat(np.eye(4), 2, axis=1), np.repeat(np.arange(4), 2))
    assert perfect["instance"]["map"] == 1.0 and perfect["instance"]["rsum"] == 600


def _sorted_reference(scores, rel):
    """MAP, R@K and the PR curve from a full stable sort of every row (the textbook definition)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(rel, order, axis=1).astype(float)
    hits = ranked.cumsum(axis=1)
    precision = hits / np.arange(1, ranked.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * ranked).sum(axis=1) / ranked.sum(axis=1)
        recall = hits / ranked.sum(axis=1, keepdims=True)
    first = np.where(ranked.any(axis=1), ranked.argmax(axis=1), 10**9)
    keep = ranked.any(axis=1)
    best_from = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1][keep]
    pr = [best_from[np.arange(keep.sum()), np.argmax(recall[keep] >= lv - 1e-12, axis=1)].mean() for lv in PR_LEVELS]
    return ap, {k: float((first < k).mean()) for k in (1, 5, 10)}, np.array(pr)


@pytest.mark.parametrize("counted", [True, False])
def test_counted_and_sorted_ranks_agree_with_a_full_sort_with_ties_and_empty_rows(counted, monkeypatch):
    """Both ways of finding the hits' ranks (counting for few relevant items, sorting for many)
    give the full sort's metrics, ties broken in gallery order, rows without a positive ignored."""
    import fbnet.metrics as metrics

    monkeypatch.setattr(metrics, "COUNTED_HITS", 64 if counted else 0)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 500)  # several row chunks
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((30, 60)), 1)  # many ties
    rel = rng.random((30, 60)) < 0.1
    rel[:3] = False
    ap, recall, pr = _sorted_reference(scores, rel)
    assert np.allclose(metrics.average_precision(scores, rel), ap, equal_nan=True)
    assert np.isnan(metrics.average_precision(scores, rel)[:3]).all()
    assert metrics.recall_at_k(scores, rel) == recall
    assert np.allclose(metrics.pr_curve(scores, rel), pr)

