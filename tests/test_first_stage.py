"""The first stage for large galleries: index choice, IVF against exact search, saved indexes."""

import numpy as np
import pytest

from fbnet.runtime.gallery.first_stage import DEFAULT_NPROBE, FirstStage, FirstStageError, choose_spec


def unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_choice_follows_size_and_memory():
    assert choose_spec(99_999, 512) == "Flat"
    assert choose_spec(1_000_000, 512) == "IVF4096,Flat"  # 4 sqrt(1M) = 4,000 -> 4,096 lists
    assert choose_spec(1_000_000, 512, memory_budget=1 << 30) == "IVF4096,PQ64"  # 2 GB of floats do not fit 1 GB
    assert choose_spec(1_000_000, 512, memory_budget=20 << 20) == "IVF4096,PQ16"
    assert choose_spec(50, 8, kind="ivf") == "IVF1,Flat"  # k-means needs about 39 points a list
    assert choose_spec(10, 8, kind="hnsw") == "HNSW32"
    with pytest.raises(ValueError, match="ivf"):
        choose_spec(10, 8, kind="ivfpq")


def test_ivf_equals_flat_when_nprobe_covers_every_list(tmp_path):
    vectors, queries = unit_vectors(4000, 32), unit_vectors(7, 32, seed=1)
    exact = FirstStage(vectors, use_faiss=False).top(queries, 25)
    ivf = FirstStage(vectors, spec="IVF16,Flat")
    scores, idx = ivf.top(queries, 25, nprobe=16)
    np.testing.assert_array_equal(idx, exact[1])
    np.testing.assert_allclose(scores, exact[0], atol=1e-5)
    few = ivf.top(queries, 25, nprobe=1)[1]  # one list of 16: a different (approximate) answer
    assert (few != exact[1]).any()
    ivf.save(tmp_path / "first_stage.faiss")
    loaded = FirstStage.load(tmp_path / "first_stage.faiss", 4000, "IVF16,Flat")
    np.testing.assert_array_equal(loaded.top(queries, 25, nprobe=16)[1], exact[1])
    assert DEFAULT_NPROBE >= 16 and (loaded.top(queries, 25)[1] == exact[1]).all()  # default nprobe covers 16 lists


def test_bad_index_files_are_named(tmp_path):
    ivf = FirstStage(unit_vectors(500, 16), spec="IVF4,Flat")
    path = tmp_path / "first_stage.faiss"
    ivf.save(path)
    with pytest.raises(FirstStageError, match="holds 500 vectors but the gallery has 501"):
        FirstStage.load(path, 501, "IVF4,Flat")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FirstStageError, match="first_stage.faiss: unreadable first-stage index"):
        FirstStage.load(path, 500, "IVF4,Flat")


def test_gallery_with_an_ivf_first_stage(bundle, gallery_inputs, tmp_path):
    """`index --first-stage ivf` saves the index; two-stage search through it equals exact
    two-stage search when nprobe covers every list."""
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images, read_captions
    from fbnet.runtime.gallery.gallery import Gallery
    from fbnet.runtime.search.searcher import Searcher

    b = open_bundle(bundle)
    r = Retriever(b, OnnxRuntimeBackend(b))
    images, captions = list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt")
    build_gallery(r, images, captions, tmp_path / "g", first_stage="ivf")
    g = Gallery(tmp_path / "g", b)
    assert (tmp_path / "g" / "images" / "first_stage.faiss").is_file() and g.meta.first_stage["images"].startswith("IVF")
    ivf = Searcher(r, g.image_features, g.text_features, 5, image_stage=g.first_stage("images"),
                   text_stage=g.first_stage("texts"))
    exact = Searcher(r, g.image_features, g.text_features, 5)
    queries = r.encode_texts(captions[:3])
    for a, e in zip(ivf.images_for(queries, 3, nprobe=1024), exact.images_for(queries, 3)):
        np.testing.assert_array_equal(a.index, e.index)
