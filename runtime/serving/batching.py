"""Micro-batching: one inference worker drains a bounded queue of requests in batches.

The design is Triton's dynamic batcher: requests queue up while the worker is busy; when it is
free it takes the oldest request, waits at most ``max_wait_ms`` for more (0: takes only what is
already queued), and hands up to ``max_batch`` requests of one kind to that kind's handler in a
single call. Only the worker thread touches the model sessions, so no lock is needed around them.

* A full queue refuses new work at once (:class:`QueueFull`; the server answers 503 with
  ``Retry-After``), so overload sheds requests instead of growing latency without bound.
* A handler returns one result per request, or an exception in that request's slot; if the
  batched call itself raises, its requests are retried one at a time, so one bad request never
  fails the others of its batch.
* A request whose caller has gone (its future cancelled, e.g. a client that timed out) is skipped.
* :meth:`MicroBatcher.stop` finishes everything already queued, then ends the worker.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fbnet.errors import FbnetError

#: ``handler(payloads) -> results``: one result (or an exception instance) per payload, in order
Handler = Callable[[list[Any]], list[Any]]


class QueueFull(FbnetError, RuntimeError):
    """The request queue is full; try again later."""

    http_status = 503


@dataclass
class _Request:
    kind: str
    payload: Any
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    def __init__(self, handlers: dict[str, Handler], max_batch: int = 16, max_wait_ms: float = 0.0,
                 max_queue: int = 256, on_batch: Callable[[str, int], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.handlers, self.max_batch, self.max_wait = handlers, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda kind, size: None)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fbnet-inference", daemon=True)
        self._accepting = False

    # -- client side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch in the worker)."""
        return self._queue.qsize()

    def submit(self, kind: str, payload: Any) -> Future:
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r}")
        if not self._accepting:
            raise QueueFull("the server is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"busy: {self.max_queue} requests are already queued; retry shortly")
        request = _Request(kind, payload)
        self._queue.put(request)
        return request.future

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, end the worker."""
        self._accepting = False
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # -- worker side ----------------------------------------------------------------------------
    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline = [first], time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                        if self.max_wait else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # run this batch, then end
                    break
                batch.append(item)
            kinds: dict[str, list[_Request]] = {}
            for r in batch:
                kinds.setdefault(r.kind, []).append(r)
            for kind, requests in kinds.items():
                self._run(kind, [r for r in requests if r.future.set_running_or_notify_cancel()])
        while True:  # requests that raced past the stop flag
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                self._run(item.kind, [item])

    def _run(self, kind: str, requests: list[_Request]) -> None:
        if not requests:
            return
        try:
            results = self.handlers[kind]([r.payload for r in requests])
            if len(results) != len(requests):
                raise RuntimeError(f"{kind} handler returned {len(results)} results for {len(requests)} requests")
        except Exception as exc:  # noqa: BLE001  (isolated below)
            if len(requests) > 1:
                for r in requests:  # one at a time: only the faulty request fails
                    self._run(kind, [r])
                return
            results = [exc]
        self.on_batch(kind, len(requests))
        for r, result in zip(requests, results):
            if isinstance(result, BaseException):
                r.future.set_exception(result)
            else:
                r.future.set_result(result)
