"""The micro-batching worker and the search server (uvicorn on loopback, started and stopped here)."""

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from fbnet.preprocess import load_image
from fbnet.runtime.serving.batching import MicroBatcher, QueueFull
from fbnet.runtime.serving.server import SearchServer, ServeConfig, listen, uvicorn_server
from fbnet.runtime.serving.service import ImageQuery, SearchService, TextQuery


# -- the batcher ----------------------------------------------------------------------------------
def test_batcher_batches_queued_requests_and_isolates_a_failure():
    gate, sizes = threading.Event(), []

    def handler(payloads):
        gate.wait(10)
        sizes.append(len(payloads))
        if "boom" in payloads:
            raise RuntimeError("the batched call failed")
        return [ValueError(p) if p == "bad" else p.upper() for p in payloads]

    b = MicroBatcher({"t": handler}, max_batch=8, max_queue=100)
    b.start()
    first = b.submit("t", "first")  # the worker takes it and blocks on the gate
    time.sleep(0.2)
    rest = [b.submit("t", p) for p in ["a", "bad", "boom", "b", "c"]]
    assert b.depth == 5
    gate.set()
    assert first.result(10) == "FIRST"
    assert [f.result(10) for f in (rest[0], rest[3], rest[4])] == ["A", "B", "C"]
    with pytest.raises(ValueError):
        rest[1].result(10)
    with pytest.raises(RuntimeError, match="batched call failed"):
        rest[2].result(10)
    # one batch of 5 failed as a whole, then each of its requests ran alone
    assert sizes[:2] == [1, 5] and sizes[2:] == [1] * 5
    b.stop(10)


def test_batcher_refuses_when_full_and_drains_on_stop():
    gate = threading.Event()
    b = MicroBatcher({"t": lambda ps: [gate.wait(10) and p for p in ps]}, max_batch=2, max_queue=3)
    b.start()
    running = b.submit("t", 0)
    time.sleep(0.2)
    queued = [b.submit("t", i) for i in (1, 2, 3)]
    with pytest.raises(QueueFull):
        b.submit("t", 4)
    stopper = threading.Thread(target=b.stop, args=(10,))
    stopper.start()
    time.sleep(0.1)
    with pytest.raises(QueueFull, match="shutting down"):
        b.submit("t", 5)
    gate.set()
    stopper.join(10)
    assert running.result(0) == 0 and [f.result(0) for f in queued] == [1, 2, 3]


def test_batcher_waits_up_to_max_wait_for_more():
    sizes = []
    b = MicroBatcher({"t": lambda ps: sizes.append(len(ps)) or ps}, max_batch=4, max_wait_ms=300)
    b.start()
    futures = [b.submit("t", i) for i in range(3)]
    time.sleep(0.05)
    futures.append(b.submit("t", 3))  # arrives within the wait: same batch
    assert [f.result(5) for f in futures] == [0, 1, 2, 3] and sizes == [4]
    b.stop(5)


# -- batched search equals one query at a time -----------------------------------------------------
def test_batched_search_equals_one_at_a_time(served, gallery_inputs):
    retriever, g, _ = served
    service = SearchService(retriever, g, shortlist=4, rerank_lanes=2)  # a batch's re-ranks run in parallel
    assert len(service.searcher.lanes) == 2
    texts = [TextQuery("a big red circle on grass", 3), TextQuery("two small blue squares", 5, 0),
             TextQuery("   ", 3), TextQuery("a green triangle", 2, 8), TextQuery("a yellow star", 4)]
    batched = service.search_texts(texts)
    for q, got in zip(texts, batched):
        alone = service.search_texts([q])[0]
        if isinstance(alone, Exception):
            assert isinstance(got, type(alone)) and str(got) == str(alone)
            continue
        assert [h["index"] for h in got["hits"]] == [h["index"] for h in alone["hits"]]
        assert np.allclose([h["score"] for h in got["hits"]], [h["score"] for h in alone["hits"]], atol=1e-5)
    paths = sorted((gallery_inputs / "images").iterdir())[:4]
    images = [ImageQuery(load_image(p, retriever.bundle.canvas), k, s, p.name)
              for p, k, s in zip(paths, (3, 5, 2, 4), (None, 0, 6, 2))]
    for q, got in zip(images, service.search_images(images)):
        alone = service.search_images([q])[0]
        assert [h["index"] for h in got["hits"]] == [h["index"] for h in alone["hits"]]
        assert np.allclose([h["score"] for h in got["hits"]], [h["score"] for h in alone["hits"]], atol=1e-5)


# -- the HTTP server --------------------------------------------------------------------------------
@contextmanager
def running(server: SearchServer, http: str = "h11"):
    """Serve ``server`` from a thread on a free loopback port; stop it as SIGTERM would."""
    sock = listen("127.0.0.1", 0)
    userver = uvicorn_server(server, http)
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.wait_ready(60), server.load_error
        yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        userver.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def request(url, data=None, method=None, headers=None, timeout=60):
    """One HTTP request; an answer the server sends before the body is all sent (413 for an
    oversized body, then it closes) is still read, whatever the timing."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest(method or ("POST" if data is not None else "GET"), u.path + ("?" + u.query if u.query else ""))
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        if data is not None:
            try:
                conn.send(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered early and closed; its answer is waiting to be read
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def call(url, data=None, method=None, headers=None):
    status, hdrs, body = request(url, data, method, headers)
    assert hdrs["content-type"].startswith("application/json"), (status, body[:200])
    return status, json.loads(body)


@pytest.fixture(scope="module")
def live(served):
    retriever, g, _ = served
    server = SearchServer(lambda: SearchService(retriever, g, shortlist=5), ServeConfig(max_body=2_000_000,
                                                                                      max_pixels=1_000_000))
    with running(server) as base:
        yield base, server


def test_server_answers_queries_like_the_searcher(live, served, gallery_inputs):
    base, _ = live
    retriever, g, _ = served
    status, ready = call(base + "/ready")
    assert status == 200 and ready["images"] == 12 and ready["captions"] == 12 and ready["shortlist"] == 5
    assert call(base + "/health") == (200, {"status": "alive"})
    status, out = call(base + "/search/text", json.dumps({"text": "a big red circle", "top_k": 3}).encode())
    assert status == 200 and [h["rank"] for h in out["results"][0]["hits"]] == [1, 2, 3]
    expected = SearchService(retriever, g, 5).search_texts([TextQuery("a big red circle", 3)])[0]
    assert [h["index"] for h in out["results"][0]["hits"]] == [h["index"] for h in expected["hits"]]
    image = sorted((gallery_inputs / "images").iterdir())[0]
    status, out = call(base + "/search/image?top_k=2&shortlist=0", image.read_bytes())
    assert status == 200 and len(out["results"][0]["hits"]) == 2
    # the upload is ranked as the same image indexed from disk would be
    from fbnet.runtime.search.searcher import Searcher
    hits = Searcher(retriever, g.image_features, g.text_features, 0).texts_for(retriever.encode_images([image]), 2)[0]
    assert [h["index"] for h in out["results"][0]["hits"]] == list(hits.index)


def test_concurrent_queries_are_batched_with_the_same_answers(live):
    base, server = live
    captions = ["a big red circle", "two small blue squares", "a green triangle on sand", "a yellow star"] * 6
    alone = {c: call(base + "/search/text", json.dumps({"text": c}).encode())[1]["results"][0] for c in captions[:4]}
    with ThreadPoolExecutor(24) as pool:
        outs = list(pool.map(lambda c: call(base + "/search/text", json.dumps({"text": c}).encode()), captions))
    for c, (status, out) in zip(captions, outs):
        assert status == 200
        got, want = out["results"][0]["hits"], alone[c]["hits"]
        assert [h["index"] for h in got] == [h["index"] for h in want]
        assert np.allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)
    _, _, metrics = request(base + "/metrics")
    batches = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'fbnet_batch_size_(count|sum)\{kind="text"\} (\S+)', metrics.decode())}
    assert batches["sum"] > batches["count"], "no text batch held more than one query"


def test_every_failure_is_json_with_its_status(live, gallery_inputs):
    from PIL import Image

    base, _ = live
    text = base + "/search/text"
    assert call(text, b"{not json")[0] == 400
    status, err = call(text, json.dumps({"text": "   "}).encode())
    assert status == 400 and "empty caption" in err["error"]
    status, err = call(text, json.dumps({"text": "a circle", "top_k": "many"}).encode())
    assert status == 400 and "top_k must be an integer" in err["error"]
    status, err = call(base + "/search/image?top_k=0", b"x")
    assert status == 400 and "top_k must be at least 1" in err["error"]
    status, err = call(base + "/search/image", b"garbage")
    assert status == 400 and "cannot decode" in err["error"]
    assert call(base + "/search/image", b"")[0] == 400
    assert call(base + "/nowhere")[0] == 404
    assert call(base + "/gallery/image/999")[0] == 404
    assert call(base + "/gallery/image/..%2F..%2Fetc%2Fpasswd")[0] == 404
    status, _ = call(text)  # GET on a POST route
    assert status == 405
    assert call(text, b"{}", method="PUT")[0] == 405
    assert call(base + "/health", method="DELETE")[0] == 405
    status, err = call(text, b"x" * 2_000_001)
    assert status == 413 and "limit" in err["error"]
    # a small PNG that declares 4,000 x 4,000 pixels: refused from its header, before decoding
    bomb = gallery_inputs / "bomb.png"
    Image.new("L", (4000, 4000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 100_000
    status, err = call(base + "/search/image", bomb.read_bytes())
    assert status == 413 and "4000x4000" in err["error"]


def test_slow_bodies_time_out_without_holding_the_worker(served):
    retriever, g, _ = served
    server = SearchServer(lambda: SearchService(retriever, g, 5), ServeConfig(body_timeout=0.5))
    with running(server) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"text\": ")
        t0 = time.perf_counter()  # meanwhile another client is answered
        assert call(base + "/search/text", json.dumps({"text": "a red circle"}).encode())[0] == 200
        assert time.perf_counter() - t0 < 0.5
        slow.settimeout(10)
        answer = b""
        while b"not received within" not in answer and (chunk := slow.recv(4096)):
            answer += chunk
        slow.close()
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "not received within" in answer


class Gated(SearchService):
    """The real service, held at a gate (to fill the queue) or failing on one caption."""

    gate, entered = threading.Event(), threading.Event()
    gate.set()  # open while the server warms up

    def search_texts(self, queries):
        self.entered.set()
        self.gate.wait(30)
        if any(q.text == "explode" for q in queries):
            raise RuntimeError("something unexpected")
        return super().search_texts(queries)


def test_full_queue_503_and_unexpected_error_500_with_id(served, caplog):
    retriever, g, _ = served
    server = SearchServer(lambda: Gated(retriever, g, 5), ServeConfig(max_batch=2, max_queue=2))
    with running(server) as base:
        Gated.gate.clear()
        Gated.entered.clear()
        body = json.dumps({"text": "a red circle"}).encode()
        with ThreadPoolExecutor(8) as pool:
            held = [pool.submit(call, base + "/search/text", body)]  # the worker takes it and waits at the gate
            assert Gated.entered.wait(10)
            held += [pool.submit(call, base + "/search/text", body) for _ in range(2)]  # these two fill the queue
            deadline = time.time() + 10
            while server.batcher.depth < 2 and time.time() < deadline:
                time.sleep(0.02)
            status, headers, raw = request(base + "/search/text", body)
            assert status == 503 and headers["Retry-After"] == "1" and "busy" in json.loads(raw)["error"]
            Gated.gate.set()
            assert [f.result(30)[0] for f in held] == [200, 200, 200]
        with caplog.at_level("INFO", logger="fbnet.serve"):
            status, err = call(base + "/search/text", json.dumps({"text": "explode"}).encode())
            status_ok, _ = call(base + "/search/text", body)  # the server still answers
        assert status == 500 and status_ok == 200
        assert re.fullmatch(r"[0-9a-f]{12}", err["error_id"])
        assert any(err["error_id"] in r.getMessage() and r.exc_info for r in caplog.records)
        assert any('"POST /search/text" 500' in r.getMessage() for r in caplog.records)
        _, _, metrics = request(base + "/metrics")
        text = metrics.decode()
        for line in ('fbnet_requests_total{route="/search/text",status="503"} 1.0',
                     'fbnet_requests_total{route="/search/text",status="500"} 1.0', "fbnet_queue_depth 0.0",
                     "fbnet_rejected_total 1.0"):
            assert line in text, line
        assert re.search(r'fbnet_request_duration_seconds_bucket\{le="0.5",route="/search/text"\} [1-9]', text)


def test_ready_is_503_until_loaded(served):
    retriever, g, _ = served
    loading = threading.Event()

    def slow_load():
        loading.wait(30)
        return SearchService(retriever, g, 5)

    server = SearchServer(slow_load)
    sock = listen("127.0.0.1", 0)
    userver = uvicorn_server(server, "h11")
    thread = threading.Thread(target=userver.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                assert call(base + "/health")[0] == 200
                break
            except urllib.error.URLError:
                time.sleep(0.05)
        status, out = call(base + "/ready")
        assert status == 503 and out["status"] == "loading"
        assert call(base + "/search/text", json.dumps({"text": "a circle"}).encode())[0] == 503
        loading.set()
        assert server.wait_ready(30) and call(base + "/ready")[0] == 200
    finally:
        userver.should_exit = True
        thread.join(30)
        sock.close()


class Idle:
    """A service that loads at once and is never asked (for tests of the HTTP layer alone)."""

    backend = "none"

    def warm(self):
        pass

    def info(self):
        return {}

    def search_texts(self, queries):
        raise AssertionError("not asked")

    search_images = search_texts


def raw_exchange(port: int, head: bytes, pieces: int = 1) -> bytes:
    """Send ``head`` in ``pieces`` (stopping when the server closes) and read what it answers."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    step = -(-len(head) // pieces)
    try:
        for i in range(0, len(head), step):
            conn.sendall(head[i: i + step])
            if pieces > 1:
                time.sleep(0.002)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered early and closed
    answer = b""
    try:
        while chunk := conn.recv(65536):
            answer += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    conn.close()
    return answer


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_request_heads_over_the_limit_get_431(http):
    """A request line and headers over ``max_header_bytes`` get 431 (JSON) with either parser;
    uvicorn alone bounds them only with h11 (a plain 400), and httptools took a 200 KB header."""
    if http == "httptools":
        pytest.importorskip("httptools", reason="httptools (the fast extra) is not installed")
    server = SearchServer(Idle, ServeConfig(max_header_bytes=4096))
    with running(server, http) as base:
        port = int(base.rsplit(":", 1)[1])

        def head(*headers: str) -> bytes:
            return ("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + "".join(h + "\r\n" for h in headers)
                    + "\r\n").encode()

        def status(answer: bytes) -> int:
            return int(answer.split(b" ", 2)[1]) if answer else 0

        assert status(raw_exchange(port, head("X-Fits: " + "a" * 3000))) == 200
        assert status(raw_exchange(port, head("X-Fits: " + "a" * 3000), pieces=40)) == 200
        for big in (head("X-Big: " + "a" * 200_000),  # one header, at once
                    head(*(f"X-{i}: " + "a" * 100 for i in range(60)))):  # many small ones
            answer = raw_exchange(port, big)
            assert status(answer) == 431, answer[:200]
            assert "4,096-byte limit" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        # a header that never ends, sent in pieces: refused while it is still arriving
        endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 100_000
        assert status(raw_exchange(port, endless, pieces=100)) == 431
        assert call(base + "/health")[0] == 200  # and the server goes on


def test_page_runs_a_search_in_a_headless_browser(live, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    base, _ = live
    assert b"fbnet" in request(base + "/")[2]
    assert request(base + "/gallery/image/0")[1]["content-type"] == "image/png"
    url = base + "/?q=a+big+red+circle"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=15000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    hits = re.findall(r'<figure class="hit"><img src="/gallery/image/(\d+)"', dom)
    assert len(hits) == 5 and "12 images, 12 captions" in dom, dom[-2000:]  # top 8 of a shortlist of 5
    shot = tmp_path / "search-page.png"
    subprocess.run([chromium, *flags, "--window-size=1000,900", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    artefacts = tmp_path.parents[1] / "artefacts"  # kept after the run, beside pytest's tmp dirs
    artefacts.mkdir(exist_ok=True)
    shutil.copy(shot, artefacts / "search-page.png")


def test_serve_command_drains_in_flight_requests_on_sigterm_without_torch(served):
    _, _, gallery = served
    bundle = served[0].bundle.root
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fbnet.runtime.cli import main\n"
            f"sys.exit(main(['serve', '--bundle', {str(bundle)!r}, '--gallery', {str(gallery)!r}, '--port', '0',"
            " '--max-wait-ms', '400', '--quiet']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        base = match.group(1)
        deadline = time.time() + 60
        while request(base + "/ready")[0] != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        body = json.dumps({"text": "a green triangle", "shortlist": 0}).encode()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, base + "/search/text", body) for _ in range(6)]
            time.sleep(0.15)  # the requests wait in the batcher (max wait 400 ms) ...
            proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop
            answers = [f.result(30) for f in futures]
        assert [s for s, _ in answers] == [200] * 6
        assert all(len(out["results"][0]["hits"]) == 5 and out["backend"] == "onnxruntime" for _, out in answers)
        assert proc.wait(timeout=30) == 0
        with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
            request(base + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
