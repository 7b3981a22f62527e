"""Two-stage search (first stage + fused re-ranking), on the tiny model."""

import numpy as np

from fbnet.runtime.gallery.first_stage import FirstStage
from fbnet.runtime.gallery.first_stage import pooled_images, pooled_texts
from fbnet.runtime.search.searcher import Searcher


def test_first_stage_is_exact_top_k():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    queries = rng.normal(size=(7, 32)).astype(np.float32)
    brute = queries @ vectors.T
    for use_faiss in (False, None):
        scores, idx = FirstStage(vectors, use_faiss=use_faiss).top(queries, 20)
        assert idx.shape == (7, 20)
        assert np.array_equal(idx, np.argsort(-brute, axis=1, kind="stable")[:, :20])
        assert np.allclose(scores, np.take_along_axis(brute, idx, axis=1), atol=1e-5)


def test_first_stage_is_the_trained_level1_similarity(served):
    """For one block and one window eqs. (13)-(15) give S^B_1 = 2 cos(v, e): the first stage ranks
    by exactly that trained matrix."""
    retriever, g, _ = served
    _, parts = retriever.score(g.image_features, g.text_features, per_key=True)
    cos = pooled_images(g.image_features) @ pooled_texts(g.text_features).T
    assert np.allclose(parts["B1"], 2 * cos, atol=1e-4)


def test_two_stage_equals_exhaustive_when_the_shortlist_covers_the_gallery(served):
    retriever, g, _ = served
    n_img, n_cap = len(g.images), len(g.captions)
    texts = retriever.encode_texts(["a big red circle on grass", "two small blue squares"])
    images = g.image_features.take(slice(0, 3))
    exhaustive = Searcher(retriever, g.image_features, g.text_features, shortlist=0)
    covering = Searcher(retriever, g.image_features, g.text_features, shortlist=max(n_img, n_cap))
    for a, b in zip(exhaustive.images_for(texts, n_img), covering.images_for(texts, n_img)):
        assert np.array_equal(a.index, b.index) and np.allclose(a.score, b.score, atol=1e-5)
    for a, b in zip(exhaustive.texts_for(images, 5), covering.texts_for(images, 5)):
        assert np.array_equal(a.index, b.index) and np.allclose(a.score, b.score, atol=1e-5)


def test_short_shortlist_reranks_the_first_stage_candidates(served):
    retriever, g, _ = served
    texts = retriever.encode_texts(["a big red circle on grass"])
    full = retriever.score(g.image_features, texts)[:, 0]
    stage = FirstStage(pooled_images(g.image_features))
    _, cand = stage.top(pooled_texts(texts), 4)
    hits = Searcher(retriever, g.image_features, g.text_features, shortlist=4).images_for(texts, 3)[0]
    assert set(hits.index) <= set(cand[0]) and len(hits.index) == 3
    assert np.allclose(hits.score, full[hits.index], atol=1e-5)  # the fused score, not the first stage's
    best = cand[0][np.argsort(-full[cand[0]], kind="stable")[:3]]
    assert np.array_equal(hits.index, best)


def test_one_caption_rerank_runs_the_reranker_graph_with_the_scorers_values(served):
    retriever, g, _ = served
    texts = retriever.encode_texts(["a big red circle on grass", "two small blue squares", "a green triangle",
                                    "a yellow star", "a purple cross"])
    used, run = [], retriever.backend.run

    def spy(graph, feeds):
        used.append(graph)
        return run(graph, feeds)

    retriever.backend.run = spy
    try:
        many = retriever.score(g.image_features, texts)  # 5 captions x 9 windows >= 36 blocks: scorer
        assert set(used) == {"scorer"}
        used.clear()
        # one caption: the reranker for every box-count group whose blocks outnumber its 9 windows
        # (a one-box group has K = 9 blocks at F-Net level 3: the scorer is no dearer there)
        one = retriever.score(g.image_features, texts.take(slice(1, 2)))
        counts = {int(n) for n in np.asarray(g.image_features.fg_mask).sum(axis=1)}
        assert "reranker" in used if max(counts) > 1 else set(used) == {"scorer"}
    finally:
        retriever.backend.run = run
    assert np.allclose(one[:, 0], many[:, 1], atol=1e-5)
