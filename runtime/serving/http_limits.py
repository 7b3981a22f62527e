"""A bound on the size of a request's head (request line and headers), whichever HTTP parser
uvicorn runs: a head over ``limit`` bytes is answered 431 with a JSON error.

uvicorn bounds the head only with its h11 parser, and only the part that has not yet arrived
whole (``h11_max_incomplete_event_size``, answered with a plain-text 400); its httptools parser,
which ``--http auto`` picks when httptools is installed, takes any size (a 200 KB header was
answered 200). Two checks together bound it exactly and bound what a connection can make the
server hold:

* :func:`head_bytes` measures every parsed head; the server's outermost middleware answers 431 to
  one over the limit before any route runs.
* :func:`bounded_protocol` returns uvicorn's protocol for the parser, subclassed so that a head
  still arriving is refused (431, connection closed) once it is over the limit: h11 stops there
  itself, and its 400 becomes the 431 here; for httptools the chunks that arrive wholly inside an
  unfinished head are counted (at most the head's true size, so a head within the limit is never
  refused). Either way the server holds at most the limit plus one read of a head.

The limit travels in uvicorn's ``Config.h11_max_incomplete_event_size``.
"""

from __future__ import annotations

import functools
import json
import logging

log = logging.getLogger("fbnet.serve")
#: default bound of a request's line and headers (h11's own default)
MAX_HEADER_BYTES = 16 * 1024


def head_error(limit: int) -> str:
    return f"request line and headers are over the {limit:,}-byte limit"


def head_bytes(scope: dict) -> int:
    """Bytes of an HTTP request's head as parsed (method, target, version, each header line)."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b"")) + 1
    return len(scope["method"]) + target + 11 + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + 2


def too_large(limit: int) -> bytes:
    """The whole 431 answer, as bytes on the wire."""
    body = json.dumps({"error": head_error(limit)}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body


#: seconds a refused connection stays half-open, so the client reads the 431 before it closes
LINGER = 2.0


def _refuse(protocol) -> None:
    """Answer 431 and close gently: stop sending, drop what still arrives, close after
    :data:`LINGER` s (closing at once with unread bytes would reset the connection, and the client
    could lose the answer while still sending its head)."""
    limit = protocol.config.h11_max_incomplete_event_size
    client = protocol.client or ("-", 0)
    log.warning("%s: request head over the %d-byte limit: 431", client[0], limit)
    protocol.refused = True
    transport = protocol.transport
    transport.write(too_large(limit))
    try:
        transport.write_eof()
    except (NotImplementedError, OSError, RuntimeError):
        transport.close()
        return
    protocol.loop.call_later(LINGER, transport.close)


@functools.cache
def _bounded_h11():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        refused = False

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # h11 raised "Receive buffer too long" exactly when it holds more than the limit
            if len(self.conn.trailing_data[0]) > self.config.h11_max_incomplete_event_size:
                _refuse(self)
            else:
                super().send_400_response(msg)

    return BoundedH11


@functools.cache
def _bounded_httptools():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._in_head, self._began, self._arrived = True, False, 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._began, self._arrived = True, True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        refused = False

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            self._began = False
            super().data_received(data)
            # the head began before this chunk and is still unfinished: the chunk is all head
            if self._in_head and not self._began and not self.transport.is_closing() and not self.refused:
                self._arrived += len(data)
                if self._arrived > self.config.h11_max_incomplete_event_size:
                    _refuse(self)

    return BoundedHttpTools


def bounded_protocol(http: str = "auto"):
    """uvicorn's protocol class for ``http`` (``auto``: httptools when installed, else h11), with
    the head bound above."""
    if http == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            http = "h11"
        else:
            http = "httptools"
    return _bounded_httptools() if http == "httptools" else _bounded_h11()
