"""Sharded galleries searched as one: the same hits as one gallery, resume by shard, bad shards named."""

import json
import shutil

import numpy as np
import pytest

from fbnet.runtime.gallery.first_stage import FirstStage
from fbnet.runtime.gallery.shards import ConcatList, ConcatRows, MergedStage


def test_concatenated_rows_lists_and_first_stages():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3, 4)).astype(np.float32) for n in (5, 1, 7)]
    whole = np.concatenate(parts)
    rows = ConcatRows(parts)
    assert rows.shape == (13, 3, 4) and len(rows) == 13
    for index in ([12, 0, 5, 6, 5], slice(3, 9), np.array([1])):
        np.testing.assert_array_equal(rows[index], whole[index])
    np.testing.assert_array_equal(rows[6], whole[6])
    np.testing.assert_array_equal(np.asarray(rows), whole)
    names = ConcatList([["a", "b"], [], ["c"]])
    assert len(names) == 3 and names[2] == "c" and names[-1] == "c" and list(names) == ["a", "b", "c"]
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = vecs[:4]
    merged = MergedStage([FirstStage(vecs[:120], spec="IVF2,Flat"), FirstStage(vecs[120:], use_faiss=False)],
                         np.array([0, 120]))
    exact = FirstStage(vecs, use_faiss=False).top(q, 10)
    got = merged.top(q, 10, nprobe=2)
    np.testing.assert_array_equal(got[1], exact[1])
    np.testing.assert_allclose(got[0], exact[0], atol=1e-5)


def test_sharded_gallery_searches_as_one(bundle, gallery_inputs, tmp_path):
    from fbnet.runtime.engine.backends import OnnxRuntimeBackend
    from fbnet.runtime.engine.bundle import open_bundle
    from fbnet.runtime.engine.retriever import Retriever
    from fbnet.runtime.gallery.build import build_gallery, list_images, read_captions
    from fbnet.runtime.gallery.gallery import GalleryError
    from fbnet.runtime.gallery.shards import ShardedGallery, build_sharded
    from fbnet.runtime.gallery import open_gallery
    from fbnet.runtime.search.searcher import Searcher

    b = open_bundle(bundle)
    r = Retriever(b, OnnxRuntimeBackend(b))
    images, captions = list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt")
    one = open_gallery(build_gallery(r, images, captions, tmp_path / "one"), b)
    sharded = open_gallery(build_sharded(r, images, captions, tmp_path / "sharded", shard_size=5), b)
    assert isinstance(sharded, ShardedGallery) and len(sharded.shards) == 3
    assert list(sharded.images) == list(one.images) and sharded.captions[11] == one.captions[11]
    text_q, image_q = r.encode_texts(captions[:4]), r.encode_images(images[:3])
    for shortlist in (4, 0):  # two-stage and exhaustive
        a = Searcher(r, one.image_features, one.text_features, shortlist)
        s = Searcher(r, sharded.image_features, sharded.text_features, shortlist)
        for x, y in zip(a.images_for(text_q, 3) + a.texts_for(image_q, 3), s.images_for(text_q, 3) + s.texts_for(image_q, 3)):
            np.testing.assert_array_equal(x.index, y.index)
            np.testing.assert_allclose(x.score, y.score, atol=1e-5)
    # resume: a lost shard is rebuilt, the others are kept
    kept = (tmp_path / "sharded" / "shard-00000" / "gallery.json").stat().st_mtime_ns
    shutil.rmtree(tmp_path / "sharded" / "shard-00001")
    build_sharded(r, images, captions, tmp_path / "sharded", shard_size=5)
    assert (tmp_path / "sharded" / "shard-00000" / "gallery.json").stat().st_mtime_ns == kept
    assert len(open_gallery(tmp_path / "sharded", b).images) == 12
    # bad shards are named
    listing = tmp_path / "sharded" / "shards.json"
    meta = json.loads(listing.read_text())
    meta["shards"][1]["images"] = 4
    listing.write_text(json.dumps(meta))
    with pytest.raises(GalleryError, match="shard-00001: holds 5 images .* lists 4"):
        open_gallery(tmp_path / "sharded", b)
    meta["shards"][1]["images"] = 5
    listing.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "sharded" / "shard-00002")
    with pytest.raises(GalleryError, match="shard-00002/gallery.json: missing"):
        open_gallery(tmp_path / "sharded", b)


def test_lazy_rows_take_trailing_indices():
    parts = [np.arange(24, dtype=np.float32).reshape(4, 2, 3), np.arange(6, dtype=np.float32).reshape(1, 2, 3)]
    whole, rows = np.concatenate(parts), ConcatRows(parts)
    for index in ((slice(None), 0), ([4, 1], 1, 2), (2, slice(None), 1), 3):
        np.testing.assert_array_equal(rows[index], whole[index])
