"""Warm serving: one process keeps the bundle's sessions and the gallery loaded and answers
HTTP + JSON, so a query pays neither interpreter start nor model loading.

::

    fbnet-serve-cli serve --bundle B --gallery G [--host 127.0.0.1] [--port 8080]

=====================  =====================================================================
``GET /health``        ``{"status": "ok", "backend", "images", "captions", "shortlist", "first_stage"}``
``POST /search/text``  JSON ``{"text": "a dog on grass", "top_k": 5, "shortlist": 100}`` -> images
``POST /search/image`` body: the image file's bytes (any format PIL reads); ``?top_k=5&shortlist=100``
                       -> captions
=====================  =====================================================================

Answers are ``{"backend": ..., "results": [one query's hits, as the CLI's --json]}``. Bad input
is a 400 with ``{"error": "..."}`` (malformed JSON, a missing or empty caption, an undecodable
image, a bad parameter), an unknown path a 404, a body over the limit a 413. The server listens
on loopback unless told otherwise; model calls are serialised (the runtime's sessions already
use every core).
"""

from __future__ import annotations

import io
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from fbnet.preprocess import ImageError, load_image

from .gallery import Gallery
from .retriever import QueryError, Retriever
from .search import Searcher, hits_json

MAX_BODY = 20 * 1024 * 1024


class RequestError(ValueError):
    """A request is malformed; answered with this status and message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class SearchService:
    """What the server does, apart from HTTP: text and image queries against one gallery."""

    def __init__(self, retriever: Retriever, gallery: Gallery, shortlist: int):
        self.retriever, self.gallery = retriever, gallery
        self.searcher = Searcher(retriever, gallery.image_features, gallery.text_features, shortlist)
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Create every session and both first stages now, so the first real query pays neither."""
        if self.gallery.images:
            self.searcher.images_for(self.retriever.encode_texts(["warm up"]), 1)
        self.searcher.text_stage  # noqa: B018  (a cached property: built here)

    def health(self) -> dict:
        stage = self.searcher.image_stage or self.searcher.text_stage
        return {"status": "ok", "backend": self.retriever.backend.name, "images": len(self.gallery.images),
                "captions": len(self.gallery.captions), "shortlist": self.searcher.shortlist,
                "first_stage": stage.backend if stage else None}

    def search_text(self, text: str, top_k: int, shortlist: int | None) -> dict:
        if not self.gallery.images:
            raise RequestError("the gallery has no images to rank for a text query")
        with self._lock:
            hits = self.searcher.images_for(self.retriever.encode_texts([text]), top_k, shortlist)
        return self._answer([hits_json(text, "text", hits[0], self.gallery.images, "image")])

    def search_image(self, data: bytes, top_k: int, shortlist: int | None) -> dict:
        if not self.gallery.captions:
            raise RequestError("the gallery has no captions to rank for an image query")
        canvas = load_image(io.BytesIO(data), self.retriever.bundle.canvas, name="uploaded image")
        with self._lock:
            hits = self.searcher.texts_for(self.retriever.encode_canvases(canvas[None]), top_k, shortlist)
        return self._answer([hits_json("<upload>", "image", hits[0], self.gallery.captions, "caption")])

    def _answer(self, results: list[dict]) -> dict:
        return {"backend": self.retriever.backend.name, "results": results}


def _int_param(value, name: str, default: int | None, minimum: int) -> int | None:
    if value is None:
        return default
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be an integer, not {value!r}") from None
    if out < minimum:
        raise RequestError(f"{name} must be at least {minimum}, not {out}")
    return out


def make_handler(service: SearchService, quiet: bool = False):
    class Handler(BaseHTTPRequestHandler):
        server_version = "fbnet-serve"

        def log_message(self, fmt, *args):  # noqa: D401  (one line per request unless quiet)
            if not quiet:
                super().log_message(fmt, *args)

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = _int_param(self.headers.get("Content-Length"), "Content-Length", 0, 0)
            if length > MAX_BODY:
                raise RequestError(f"body of {length} bytes is over the {MAX_BODY}-byte limit",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return self.rfile.read(length)

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            t0 = time.perf_counter()
            try:
                if method == "GET" and url.path == "/health":
                    answer = service.health()
                elif method == "POST" and url.path == "/search/text":
                    answer = self._text(self._body())
                elif method == "POST" and url.path == "/search/image":
                    body = self._body()
                    if not body:
                        raise RequestError("empty body: send the image file's bytes")
                    answer = service.search_image(body, _int_param(params.get("top_k"), "top_k", 5, 1),
                                                  _int_param(params.get("shortlist"), "shortlist", None, 0))
                else:
                    raise RequestError(f"no {method} {url.path}; see GET /health, POST /search/text, "
                                       "POST /search/image", HTTPStatus.NOT_FOUND)
            except RequestError as exc:
                return self._send(exc.status, {"error": str(exc)})
            except (QueryError, ImageError) as exc:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            answer["ms"] = round((time.perf_counter() - t0) * 1000, 3)
            self._send(HTTPStatus.OK, answer)

        def _text(self, body: bytes) -> dict:
            try:
                payload = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"body is not valid JSON: {exc}") from None
            if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
                raise RequestError('send JSON {"text": "a caption", "top_k": 5}')
            return service.search_text(payload["text"], _int_param(payload.get("top_k"), "top_k", 5, 1),
                                       _int_param(payload.get("shortlist"), "shortlist", None, 0))

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

    return Handler


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8080,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0: any free port; see ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), make_handler(service, quiet))
    server.daemon_threads = True
    return server
