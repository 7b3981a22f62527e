"""Two-stage search (first stage + fused re-ranking) and the warm HTTP server, on the tiny model."""

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from fbnet.runtime.backends import select_backend
from fbnet.runtime.bundle import open_bundle
from fbnet.runtime.gallery import Gallery, build_gallery, list_images, read_captions
from fbnet.runtime.retriever import Retriever
from fbnet.runtime.search import FirstStage, Searcher, pooled_images, pooled_texts


@pytest.fixture(scope="module")
def served(bundle, gallery_inputs, tmp_path_factory):
    b = open_bundle(bundle)
    retriever = Retriever(b, select_backend(b, "onnxruntime"))
    out = tmp_path_factory.mktemp("search") / "gallery"
    build_gallery(retriever, list_images(gallery_inputs / "images"), read_captions(gallery_inputs / "captions.txt"), out)
    return retriever, Gallery(out, b), out


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


def _request(url, data=None, content_type="application/json"):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_answers_and_rejects_bad_requests(served, gallery_inputs):
    from fbnet.runtime.server import SearchService, make_server

    retriever, g, _ = served
    server = make_server(SearchService(retriever, g, shortlist=5), port=0, quiet=True)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://{host}:{port}"
    try:
        status, health = _request(base + "/health")
        assert status == 200 and health["images"] == 12 and health["captions"] == 12 and health["shortlist"] == 5
        status, out = _request(base + "/search/text", json.dumps({"text": "a big red circle", "top_k": 3}).encode())
        assert status == 200 and [h["rank"] for h in out["results"][0]["hits"]] == [1, 2, 3]
        assert out["results"][0]["hits"][0]["image"].endswith(".png")
        image = sorted((gallery_inputs / "images").iterdir())[0]
        status, out = _request(base + "/search/image?top_k=2&shortlist=0", image.read_bytes(), "image/png")
        assert status == 200 and len(out["results"][0]["hits"]) == 2
        # the upload is ranked as the same image indexed from disk would be
        expected = Searcher(retriever, g.image_features, g.text_features, 0).texts_for(
            retriever.encode_images([image]), 2)[0]
        assert [h["index"] for h in out["results"][0]["hits"]] == list(expected.index)

        assert _request(base + "/search/text", b"{not json")[0] == 400
        status, err = _request(base + "/search/text", json.dumps({"text": "   "}).encode())
        assert status == 400 and "empty caption" in err["error"]
        status, err = _request(base + "/search/text", json.dumps({"text": "a circle", "top_k": "many"}).encode())
        assert status == 400 and "top_k must be an integer" in err["error"]
        status, err = _request(base + "/search/image", b"garbage", "image/jpeg")
        assert status == 400 and "cannot decode" in err["error"]
        assert _request(base + "/nowhere")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_command_starts_answers_and_stops_without_torch(served):
    _, _, gallery = served
    bundle = served[0].bundle.root
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fbnet.runtime.cli import main\n"
            f"sys.exit(main(['serve', '--bundle', {str(bundle)!r}, '--gallery', {str(gallery)!r}, '--port', '0', '--quiet']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        status, out = _request(match.group(1) + "/search/text", json.dumps({"text": "a green triangle"}).encode())
        assert status == 200 and len(out["results"][0]["hits"]) == 5 and out["backend"] == "onnxruntime"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
