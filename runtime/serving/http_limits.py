"""A bound on the size of a request's head (request line and headers), whichever HTTP parser
uvicorn runs: a head over ``limit`` bytes is answered 431 with a JSON error and the connection
closed.

uvicorn bounds the head only with its h11 parser (``h11_max_incomplete_event_size``, answered with
a plain-text 400); its httptools parser, which ``--http auto`` picks when httptools is installed,
takes any size (a 200 KB header was answered 200). :func:`bounded_protocol` returns uvicorn's
protocol for the parser, subclassed:

* h11: h11 stops at the limit; the 400 it leads to becomes the 431 here.
* httptools: the URL and every complete header are counted as they are parsed; a head that keeps
  arriving without completing (one endless header) is counted by the chunks that lie wholly
  inside it. Both counts are at most the head's true size, so a head within the limit is never
  refused, and one over it is refused before more than ``limit`` + one read of it is held.

The limit travels in uvicorn's ``Config.h11_max_incomplete_event_size``.
"""

from __future__ import annotations

import functools
import json
import logging

log = logging.getLogger("fbnet.serve")
#: default bound of a request's line and headers (h11's own default)
MAX_HEADER_BYTES = 16 * 1024


def too_large(limit: int) -> bytes:
    """The whole 431 answer, as bytes on the wire."""
    body = json.dumps({"error": f"request line and headers are over the {limit:,}-byte limit"}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)) + body


def _refuse(protocol) -> None:
    limit = protocol.config.h11_max_incomplete_event_size
    client = protocol.client or ("-", 0)
    log.warning("%s: request head over the %d-byte limit: 431", client[0], limit)
    protocol.transport.write(too_large(limit))
    protocol.transport.close()


@functools.cache
def _bounded_h11():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            # h11 raised "Receive buffer too long" exactly when it holds more than the limit
            if len(self.conn.trailing_data[0]) > self.config.h11_max_incomplete_event_size:
                _refuse(self)
            else:
                super().send_400_response(msg)

    return BoundedH11


class _HeadTooLarge(Exception):
    """Raised in a parser callback; httptools turns it into an ``HttpParserError``."""


@functools.cache
def _bounded_httptools():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._limit = self.config.h11_max_incomplete_event_size
            self._in_head, self._began, self._too_large = True, False, False
            self._parsed = self._arrived = 0  # the current head's bytes: parsed fields, whole chunks

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._began, self._parsed, self._arrived = True, True, 0, 0

        def _count(self, n: int) -> None:
            self._parsed += n
            if self._parsed > self._limit:
                self._too_large = True
                raise _HeadTooLarge

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            self._began = False
            super().data_received(data)
            # the head began before this chunk and is still incomplete: the chunk is all head
            if self._in_head and not self._began and not self._too_large and not self.transport.is_closing():
                self._arrived += len(data)
                if self._arrived > self._limit:
                    self._too_large = True
                    _refuse(self)

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                _refuse(self)
            else:
                super().send_400_response(msg)

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
