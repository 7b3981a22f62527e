"""Coded gallery stores: encode/decode round trips with bounded error, padded slots kept out,
search through a coded gallery, and damaged files named."""

import json

import numpy as np
import pytest

from fbnet.runtime.gallery.stores import CODED, CodedBlocks, StoreError, write_coded

# largest allowed mean |decoded - original| / |original| of unit vectors (d = 64), per store
BOUNDS = {"sq8": 0.02, "sq4": 0.15, "residual4": 0.15, "pq": 0.75}


def blocks_and_counts(n=600, k=9, d=64, seed=0):
    rng = np.random.default_rng(seed)
    # clustered unit vectors, as trained embeddings are (codecs exploit the structure)
    centres = rng.standard_normal((16, d))
    x = centres[rng.integers(0, 16, (n, k))] + 0.5 * rng.standard_normal((n, k, d))
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    counts = rng.integers(1, k + 1, n)
    x[np.arange(k)[None, :] >= counts[:, None]] = 0
    return x, counts


@pytest.mark.parametrize("store", sorted(CODED))
def test_round_trip_error_is_bounded(store, tmp_path):
    x, counts = blocks_and_counts()
    info = write_coded(tmp_path, "F1", x, counts, store, chunk=128)
    assert info["vectors"] == counts.sum()  # padded slots are not stored
    coded = CodedBlocks(tmp_path, "F1", info["shape"])
    rows = np.array([5, 0, 599, 17])
    got = coded[rows]
    assert got.shape == (4, 9, 64) and np.array_equal(coded[3], coded[[3]][0])
    real = np.arange(9)[None, :] < counts[rows, None]
    assert np.all(got[~real] == 0)
    err = np.linalg.norm(got[real] - x[rows][real], axis=1).mean()
    assert err < BOUNDS[store], (store, err)
    np.testing.assert_allclose(np.linalg.norm(got[real], axis=1), 1.0, atol=1e-5)  # re-normalised


def test_damaged_store_files_are_named(tmp_path):
    x, counts = blocks_and_counts(n=300)
    info = write_coded(tmp_path, "F2", x, counts, "sq4")
    (tmp_path / "F2.codec.faiss").write_bytes(b"not a codec")
    with pytest.raises(StoreError, match="F2.codec.faiss: corrupt codebook"):
        CodedBlocks(tmp_path, "F2", info["shape"])
    info = write_coded(tmp_path, "F2", x, counts, "sq4")
    np.save(tmp_path / "F2.offsets.npy", np.load(tmp_path / "F2.offsets.npy")[:-5])
    with pytest.raises(StoreError, match="F2.codes.npy: .* do not match"):
        CodedBlocks(tmp_path, "F2", info["shape"])
    (tmp_path / "F2.codes.npy").unlink()
    with pytest.raises(StoreError, match="F2.codes.npy: missing"):
        CodedBlocks(tmp_path, "F2", info["shape"])


def test_search_through_a_coded_gallery(bundle, gallery_inputs, tmp_path):
    """An sq8 gallery ranks as the float32 one does (top hits), stores fewer bytes, and keeps the
    first stage's vectors plain."""
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images, read_captions
    from fbnet.runtime.gallery.gallery import Gallery, GalleryError
    from fbnet.runtime.search.searcher import Searcher

    b = open_bundle(bundle)
    r = Retriever(b, OnnxRuntimeBackend(b))
    images, captions = list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt")
    plain = Gallery(build_gallery(r, images, captions, tmp_path / "plain"), b)
    coded = Gallery(build_gallery(r, images, captions, tmp_path / "sq8", store="sq8"), b)
    assert coded.meta.store == "sq8" and not (tmp_path / "sq8" / "images" / "F3.npy").exists()
    assert np.load(tmp_path / "sq8" / "images" / "B1.npy").dtype == np.float16
    size = lambda root: sum(p.stat().st_size for p in (root / "images").iterdir())  # noqa: E731
    assert size(tmp_path / "sq8") < size(tmp_path / "plain") / 3
    queries = r.encode_texts(captions[:4])
    for searcher_args in ((5,), (0,)):  # two-stage and exhaustive
        a = Searcher(r, plain.image_features, plain.text_features, *searcher_args).images_for(queries, 1)
        c = Searcher(r, coded.image_features, coded.text_features, *searcher_args).images_for(queries, 1)
        assert [h.index[0] for h in a] == [h.index[0] for h in c]
        np.testing.assert_allclose([h.score[0] for h in a], [h.score[0] for h in c], atol=0.02)
    meta = json.loads((tmp_path / "sq8" / "gallery.json").read_text())
    assert meta["coded"]["images"]["F3"]["bytes_per_vector"] == b.model.embed_dim
    (tmp_path / "sq8" / "texts" / "F2.codec.faiss").write_bytes(b"\x00" * 10)
    with pytest.raises(GalleryError, match="F2.codec.faiss: corrupt codebook"):
        Gallery(tmp_path / "sq8", b)
