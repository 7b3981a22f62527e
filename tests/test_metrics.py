import numpy as np
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
