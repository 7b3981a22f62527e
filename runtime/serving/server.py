"""The warm search server: an ASGI app (Starlette) on uvicorn, one micro-batching inference
worker (:mod:`fbnet.runtime.serving.batching`), Prometheus metrics and a search page.

::

    fbnet-serve-cli serve --bundle B --gallery G [--host 127.0.0.1] [--port 8080]
                          [--max-batch 64] [--max-wait-ms 0] [--max-queue 256] [--max-header-bytes 16384]

======================  ==================================================================
``GET /``               the search page (type a caption, or drop an image)
``GET /health``         200 ``{"status": "alive"}`` as soon as the process listens
``GET /ready``          200 with the gallery's counts once sessions and gallery are loaded, else 503
``GET /metrics``        Prometheus text format: requests by route and status, latency histogram,
                        queue depth, batch sizes
``POST /search/text``   JSON ``{"text": "a dog on grass", "top_k": 5, "shortlist": 100, "nprobe": 32}`` -> images
``POST /search/image``  body: the image file's bytes; ``?top_k=5&shortlist=100&nprobe=32`` -> captions
                        (``nprobe``: lists an IVF first stage visits; large galleries only)
``GET /gallery/image/N``  the file of the gallery's N-th image (only files the gallery indexed)
======================  ==================================================================

Every answer is JSON: ``{"backend", "results": [one query's hits, as the CLI's --json], "ms"}``,
or ``{"error": ...}`` with 400 (bad JSON, empty caption, bad parameter, undecodable image),
404, 405, 408 (a body not received within ``body_timeout``), 413 (body over ``max_body`` bytes,
or an image declaring over ``max_pixels``, found from its header before decoding), 431 (request
line and headers over ``max_header_bytes``: :mod:`fbnet.runtime.serving.http_limits`), 503 (queue
full or still loading; with ``Retry-After``), 504 (no answer within ``request_timeout``), 500 for
a gallery file found damaged while answering, or 500 with an ``error_id`` that the log line of
the failure also holds (anything unexpected). Every expected failure is an
:class:`~fbnet.errors.FbnetError` answered with its ``http_status``; the server catches nothing
narrower. Each request logs one line with its status and latency. SIGTERM (or Ctrl-C) stops
accepting, answers the requests in flight, drains the queue and exits 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fbnet.errors import FbnetError
from fbnet.preprocess import MAX_PIXELS, load_image

from .batching import MicroBatcher
from .http_limits import MAX_HEADER_BYTES, bounded_protocol, head_bytes, head_error
from .metrics import ServerMetrics
from .service import ImageQuery, SearchService, TextQuery

log = logging.getLogger("fbnet.serve")
PAGE = Path(__file__).with_name("page.html")
ROUTES = ("/", "/health", "/ready", "/metrics", "/search/text", "/search/image")


@dataclass
class ServeConfig:
    """Limits of the server (Triton's dynamic batcher has the first two under the same names)."""

    max_batch: int = 64            #: queries per inference call
    max_wait_ms: float = 0.0       #: how long a batch waits for more queries (0: takes what is queued)
    max_queue: int = 256           #: queued queries before 503
    max_body: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS   #: declared image pixels before 413
    body_timeout: float = 10.0     #: seconds to receive a body before 408
    request_timeout: float = 30.0  #: seconds from submit to answer before 504
    decode_threads: int = 2        #: image decodes at once (outside the inference worker)
    max_header_bytes: int = MAX_HEADER_BYTES  #: request line + headers before 431


class SearchServer:
    """Holds the service (loaded in the background: ``/health`` answers at once, ``/ready`` once
    loaded), the batcher that owns it, and the metrics; ``app`` is the ASGI application."""

    def __init__(self, load_service, config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        self._load_service = load_service
        self.service: SearchService | None = None
        self.load_error: str | None = None
        self.batcher: MicroBatcher | None = None
        self.metrics = ServerMetrics(lambda: self.batcher.depth if self.batcher else 0)
        self._loaded = threading.Event()
        self._decode_limit = anyio.CapacityLimiter(self.config.decode_threads)
        routes = [Route("/", self.page), Route("/health", self.health), Route("/ready", self.ready),
                  Route("/metrics", self.prometheus), Route("/search/text", self.search_text, methods=["POST"]),
                  Route("/search/image", self.search_image, methods=["POST"]),
                  Route("/gallery/image/{index:int}", self.gallery_image)]
        app = Starlette(routes=routes, lifespan=self._lifespan,
                        exception_handlers={HTTPException: self._http_error, FbnetError: self._fbnet_error,
                                            Exception: _internal_error})
        self.app = _Observed(app, self)

    # -- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        """Build and warm the service, then start the worker (blocking; the lifespan runs it in a thread)."""
        try:
            service = self._load_service()
            service.warm()
        except Exception as exc:  # noqa: BLE001  (reported by /ready and the log)
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading failed: %s", self.load_error)
            self._loaded.set()
            return
        c = self.config
        self.batcher = MicroBatcher({"text": service.search_texts, "image": service.search_images},
                                    c.max_batch, c.max_wait_ms, c.max_queue,
                                    on_batch=lambda kind, n: self.metrics.batch_size.labels(kind).observe(n))
        self.batcher.start()
        self.service = service  # requests are accepted from here on: the worker is running
        self._loaded.set()
        log.info("ready: %s", json.dumps(service.info()))

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self.service is not None

    def _lifespan(self, app):
        server = self

        class Lifespan:
            async def __aenter__(self):
                threading.Thread(target=server.load, name="fbnet-load", daemon=True).start()

            async def __aexit__(self, *exc):
                if server.batcher is not None:  # uvicorn has answered every request in flight
                    await anyio.to_thread.run_sync(server.batcher.stop, server.config.request_timeout)

        return Lifespan()

    # -- routes ---------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(self, request: Request) -> Response:
        if self.service is None:
            status = "failed" if self.load_error else "loading"
            return JSONResponse({"status": status, "error": self.load_error}, 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", **self.service.info(), "max_batch": self.config.max_batch})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def search_text(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
            raise HTTPException(400, 'send JSON {"text": "a caption", "top_k": 5}')
        query = TextQuery(payload["text"], _int_param(payload.get("top_k"), "top_k", 5, 1),
                          _int_param(payload.get("shortlist"), "shortlist", None, 0),
                          _int_param(payload.get("nprobe"), "nprobe", None, 1))
        return await self._answer("text", query)

    async def search_image(self, request: Request) -> Response:
        top_k = _int_param(request.query_params.get("top_k"), "top_k", 5, 1)
        shortlist = _int_param(request.query_params.get("shortlist"), "shortlist", None, 0)
        nprobe = _int_param(request.query_params.get("nprobe"), "nprobe", None, 1)
        body = await self._body(request)
        if not body:
            raise HTTPException(400, "empty body: send the image file's bytes")
        service = self._service()
        canvas = await anyio.to_thread.run_sync(  # an ImageError answers 400, ImageTooLarge 413
            lambda: load_image(io.BytesIO(body), service.retriever.bundle.canvas, name="uploaded image",
                               max_pixels=self.config.max_pixels), limiter=self._decode_limit)
        return await self._answer("image", ImageQuery(canvas, top_k, shortlist, nprobe=nprobe))

    async def gallery_image(self, request: Request) -> Response:
        """A gallery image by its index: the path comes from ``gallery.json``, never the request."""
        images = self._service().gallery.images
        index = request.path_params["index"]
        if not 0 <= index < len(images):
            raise HTTPException(404, f"no gallery image {index} (the gallery has {len(images)})")
        path = Path(images[index])
        if not path.is_file():
            raise HTTPException(404, f"gallery image {index} is indexed but its file is gone")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    # -- helpers --------------------------------------------------------------------------------
    def _service(self) -> SearchService:
        if self.service is None:
            raise HTTPException(503, "still loading the bundle and gallery" if not self.load_error
                                else f"loading failed: {self.load_error}", headers={"Retry-After": "1"})
        return self.service

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over the {limit}-byte limit")

        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"body is over the {limit}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(receive(), self.config.body_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"body not received within {self.config.body_timeout:g} s") from None

    async def _answer(self, kind: str, query) -> Response:
        service = self._service()
        t0 = time.perf_counter()
        try:
            future = self.batcher.submit(kind, query)
        except FbnetError:  # QueueFull: 503 with Retry-After
            self.metrics.rejected.inc()
            raise
        waiting = asyncio.wrap_future(future)
        try:  # the query's own FbnetError (an empty caption) propagates to _fbnet_error
            result = await asyncio.wait_for(waiting, self.config.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {self.config.request_timeout:g} s") from None
        return JSONResponse({"backend": service.backend, "results": [result],
                             "ms": round((time.perf_counter() - t0) * 1000, 3)})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    async def _fbnet_error(self, request: Request, exc: FbnetError) -> Response:
        """An expected failure: its message, with its ``http_status`` (``Retry-After`` on 503)."""
        if exc.http_status == 500:  # the server's own files: the operator needs to know
            log.error("%s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if exc.http_status == 503 else None
        return JSONResponse({"error": str(exc)}, exc.http_status, headers=headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: a 500 whose ``error_id`` the log line (with the traceback) also holds."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s in %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error; quote error_id when reporting it", "error_id": error_id}, 500)


def _int_param(value, name: str, default: int | None, minimum: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise HTTPException(400, f"{name} must be an integer, not {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be an integer, not {value!r}") from None
    if out < minimum:
        raise HTTPException(400, f"{name} must be at least {minimum}, not {out}")
    return out


class _Observed:
    """ASGI middleware: one log line and the metrics per request (the outermost layer)."""

    def __init__(self, app, server: SearchServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, started = time.perf_counter(), 500, False
        path = scope["path"]

        async def tracked_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            limit = self.server.config.max_header_bytes
            if head_bytes(scope) > limit:  # before any route (a head still arriving: http_limits)
                await JSONResponse({"error": head_error(limit)}, 431)(scope, receive, tracked_send)
            else:
                await self.app(scope, receive, tracked_send)
        except Exception as exc:  # noqa: BLE001  (Starlette re-raises what it answered as a 500)
            if not started:  # failed outside Starlette's handlers: answer here
                response = _internal_error(Request(scope), exc)
                await response(scope, receive, send)
            status = 500
        seconds = time.perf_counter() - t0
        route = path if path in ROUTES else ("/gallery/image" if path.startswith("/gallery/image/") else "other")
        self.server.metrics.observe(route, status, seconds)
        client = scope.get("client") or ("-", 0)
        log.info('%s "%s %s" %d %.1fms', client[0], scope["method"], path, status, seconds * 1000)


class ListenError(FbnetError, OSError):
    """The server cannot listen where it was asked to (the port is taken, not permitted, ...)."""


def listen(host: str = "127.0.0.1", port: int = 8080, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket (``port=0``: any free port; see ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (--host, --port)") from None
    return sock


def uvicorn_server(server: SearchServer, http: str = "auto"):
    """The uvicorn server for ``server.app`` (``http``: ``h11``, ``httptools`` or ``auto``), its
    request heads bounded by ``server.config.max_header_bytes``; set its ``should_exit`` to stop it
    as SIGTERM does."""
    import uvicorn

    config = uvicorn.Config(server.app, http=bounded_protocol(http), lifespan="on", log_level="warning",
                            access_log=False, timeout_keep_alive=5,
                            timeout_graceful_shutdown=server.config.request_timeout,
                            h11_max_incomplete_event_size=server.config.max_header_bytes)
    return uvicorn.Server(config)


def run_server(server: SearchServer, sock: socket.socket, http: str = "auto") -> None:
    """Serve on ``sock`` until SIGTERM or SIGINT, then shut down gracefully and return (exit 0)."""
    userver = uvicorn_server(server, http)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises a captured signal after its graceful shutdown; these handlers make that a
    # no-op, so a SIGTERM'd server exits 0 once every request in flight is answered
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        userver.run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
