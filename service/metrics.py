"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        # The app's own routes (create_app sets them once they exist); any other path counts as
        # "other", so that the label stays bounded.
        self.paths: frozenset[str] = frozenset()
        self.requests = Counter(
            "attention_http_requests", "HTTP requests by path and status", ["method", "path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "attention_request_seconds", "POST /attention latency, arrival to last byte sent",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_time = Histogram(
            "attention_queue_seconds", "time a request waited for the engine",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "attention_batch_requests", "client requests per engine call", buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "attention_tokens", "query tokens (B * Lq) answered", registry=self.registry,
        )
        depth = Gauge("attention_queue_depth", "requests waiting for the engine", registry=self.registry)
        depth.set_function(queue_depth)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path if path in self.paths else "other", str(status)).inc()
        if path == "/attention" and method == "POST":
            self.latency.observe(seconds)

    def observe_refused(self, status: int) -> None:
        """A request the server's protocol refused before the app saw it (bytes that are not HTTP, a
        head too long to finish): it has no method or path to name."""
        self.requests.labels("other", "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
