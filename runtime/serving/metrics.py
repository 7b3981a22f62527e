"""Prometheus metrics of the search server (``GET /metrics``, text exposition format), through the
standard ``prometheus_client`` library, in a registry of the server's own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.requests = Counter("fbnet_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("fbnet_request_duration_seconds", "Time from request to answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("fbnet_batch_size", "Queries per inference batch, by kind (text, image)",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.rejected = Counter("fbnet_rejected", "Requests refused because the queue was full",
                                registry=self.registry)
        depth = Gauge("fbnet_queue_depth", "Queries waiting for the inference worker", registry=self.registry)
        depth.set_function(queue_depth)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
