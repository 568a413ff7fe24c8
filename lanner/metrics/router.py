"""The router's Prometheus metrics (`lanner router`): requests per worker, routing
decisions by reason, retries and worker health.

Only the router imports this module (it needs prometheus_client).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip


class RouterMetrics:
    """One registry per router, so tests may build several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "lanner:router_requests",
            "Requests forwarded, by worker and the HTTP status the client got.",
            ["worker", "status"],
            registry=registry,
        )
        self.decisions = Counter(
            "lanner:router_decisions",
            "Routing decisions by reason (prefix_hit, fallback, balance, load, round_robin).",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "lanner:router_retries",
            "Requests sent to a second worker after the first failed before its first byte.",
            registry=registry,
        )
        self.failures = Counter(
            "lanner:router_worker_failures",
            "Requests a worker failed (no answer, a dropped stream or a 5xx meaning it is down).",
            ["worker"],
            registry=registry,
        )
        self.worker_up = Gauge(
            "lanner:router_worker_up", "1 while the worker is healthy.", ["worker"],
            registry=registry,
        )  # fmt: skip
        self.outstanding = Gauge(
            "lanner:router_worker_outstanding",
            "Requests forwarded to the worker and not finished.",
            ["worker"],
            registry=registry,
        )
        self.waiting = Gauge(
            "lanner:router_worker_waiting",
            "The worker's own queue depth (num_requests_waiting), as last polled.",
            ["worker"],
            registry=registry,
        )
        self.first_byte = Histogram(
            "lanner:router_time_to_first_byte_seconds",
            "From the request's arrival to the first byte forwarded to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.no_worker = Counter(
            "lanner:router_no_worker",
            "Requests refused because no worker was healthy.",
            registry=registry,
        )

    def forget_worker(self, worker: str) -> None:
        for gauge in (self.worker_up, self.outstanding, self.waiting):
            with contextlib.suppress(KeyError):
                gauge.remove(worker)

    def render(self) -> bytes:
        return generate_latest(self.registry)
