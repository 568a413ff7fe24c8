"""The engine's metrics as values (vLLM's metrics reader shapes: Counter, Gauge,
Histogram), for ``LLM.get_metrics()``; named as the server's Prometheus series are.

Pure Python: the offline engine needs none of the server's packages. The bucket bounds
live here and the server's Prometheus histograms use the same ones.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lanner.engine.core import EngineCoreStats
    from lanner.engine.outputs import RequestOutput

# Metric name prefixes: lanner's own, or vLLM's, for dashboards built on vLLM's names.
METRIC_PREFIXES = ("lanner", "vllm")

# Bucket bounds in seconds, as vLLM uses for the same series.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISHED_REASONS = ("stop", "length", "abort")


def check_prefix(prefix: str) -> str:
    if prefix not in METRIC_PREFIXES:
        raise ValueError(f"the metrics prefix must be one of {METRIC_PREFIXES}, got {prefix!r}")
    return prefix


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int | float


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    # Upper bound -> observations at or below it (cumulative, as Prometheus's "le"),
    # ending with +inf.
    buckets: dict[float, int]


@dataclass
class _Series:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def histogram(self, name: str, labels: dict[str, str]) -> Histogram:
        cumulative, running = {}, 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative[bound] = running
        return Histogram(name, labels, running, self.total, cumulative)


class EngineMetrics:
    """Counts what an engine's finished requests did; with the core's load at the time of
    reading, that is the server's /metrics, as values."""

    def __init__(self, model_name: str, prefix: str = "lanner") -> None:
        self.labels = {"model_name": model_name}
        self.prefix = check_prefix(prefix)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = _Series(TTFT_BUCKETS)
        self.tpot = _Series(TOKEN_BUCKETS)
        self.e2e = _Series(REQUEST_BUCKETS)
        self.queue = _Series(REQUEST_BUCKETS)

    def on_request_finished(self, output: RequestOutput) -> None:
        metrics = output.metrics
        reason = output.outputs[0].finish_reason or "abort"
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += len(output.prompt_token_ids)
        self.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        if metrics.time_per_output_token is not None:
            self.tpot.observe(metrics.time_per_output_token)
        if metrics.finished_time is not None:
            self.e2e.observe(metrics.finished_time - metrics.arrival_time)
        if metrics.queue_time is not None:
            self.queue.observe(metrics.queue_time)

    def read(self, core: EngineCoreStats) -> list[Metric]:
        """Every series, with the core's current load."""
        p, labels = self.prefix, self.labels
        metrics: list[Metric] = [
            Gauge(f"{p}:num_requests_running", labels, core.num_running),
            Gauge(f"{p}:num_requests_waiting", labels, core.num_waiting),
            Gauge(f"{p}:kv_cache_usage_perc", labels, core.kv_cache_usage),
            Counter(f"{p}:prefix_cache_queries", labels, core.prefix_cache_queried_tokens),
            Counter(f"{p}:prefix_cache_hits", labels, core.prefix_cache_hit_tokens),
            Counter(f"{p}:num_preemptions", labels, core.num_preemptions),
            Counter(f"{p}:prompt_tokens", labels, self.prompt_tokens),
            Counter(f"{p}:generation_tokens", labels, self.generation_tokens),
        ]
        for reason, count in self.finished.items():
            metrics.append(
                Counter(f"{p}:request_success", {**labels, "finished_reason": reason}, count)
            )
        metrics += [
            self.ttft.histogram(f"{p}:time_to_first_token_seconds", labels),
            self.tpot.histogram(f"{p}:time_per_output_token_seconds", labels),
            self.e2e.histogram(f"{p}:e2e_request_latency_seconds", labels),
            self.queue.histogram(f"{p}:request_queue_time_seconds", labels),
        ]
        return metrics
