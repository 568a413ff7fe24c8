"""The server's Prometheus metrics, named like vLLM's with the prefix ``lanner:`` (or,
with --metrics-prefix vllm, ``vllm:``, for dashboards built on vLLM's names).

Only the server imports this module (it needs prometheus_client).
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lanner.engine.core import EngineCoreStats
from lanner.engine.outputs import RequestOutput
from lanner.metrics.reader import (
    FINISHED_REASONS,
    REQUEST_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    check_prefix,
)

_LOOP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServerMetrics:
    """One registry per server, so tests may build several in one process."""

    def __init__(self, model_name: str, prefix: str = "lanner") -> None:
        self.prefix = check_prefix(prefix)
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._model = model_name

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, text, labels, buckets=buckets, registry=self.registry)

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, labels, registry=self.registry)

        self.time_to_first_token = histogram(
            "lanner:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.time_per_output_token = histogram(
            "lanner:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            TOKEN_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "lanner:inter_token_latency_seconds", "Time between output tokens.", TOKEN_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "lanner:e2e_request_latency_seconds",
            "Request latency, arrival to end.",
            REQUEST_BUCKETS,
        )
        self.request_queue_time = histogram(
            "lanner:request_queue_time_seconds",
            "Time from arrival to first being scheduled.",
            REQUEST_BUCKETS,
        )
        self.num_requests_running = gauge(
            "lanner:num_requests_running", "Sequences in the running batch."
        )
        self.num_requests_waiting = gauge(
            "lanner:num_requests_waiting", "Sequences waiting to be scheduled."
        )
        self.kv_cache_usage = gauge(
            "lanner:kv_cache_usage_perc", "Share of KV cache blocks requests hold (1 = all)."
        )
        self.prefix_cache_hit_rate = gauge(
            "lanner:prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache."
        )
        # Tokens, as vLLM's counters of the same names: rates over any window come from
        # these (the gauge above is the share since start).
        self.prefix_cache_queries = Counter(
            "lanner:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=self.registry,
        )
        self.prefix_cache_hits = Counter(
            "lanner:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            registry=self.registry,
        )
        self._seen: dict[str, int] = {}  # the core's cumulative counts, as last counted
        # Only a data-parallel server routes (lanner serve --data-parallel-size N).
        self.data_parallel_requests = Counter(
            "lanner:data_parallel_requests",
            "Requests sent to each data-parallel engine core, by why it was chosen.",
            [*labels, "engine", "reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lanner:prompt_tokens",
            "Prompt tokens of finished requests.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "lanner:generation_tokens", "Generated tokens.", labels, registry=self.registry
        )
        self.num_preemptions = Counter(
            "lanner:num_preemptions",
            "Requests preempted (their KV cache freed, to be recomputed).",
            labels,
            registry=self.registry,
        )
        self.event_loop_lag = Histogram(
            "lanner:api_event_loop_lag_seconds",
            "How late the API server's event loop woke a 10 ms timer (load or blocking).",
            buckets=_LOOP_BUCKETS,
            registry=self.registry,
        )
        self.event_loop_max_busy = Gauge(
            "lanner:api_event_loop_max_busy_seconds",
            "Longest the event loop's thread ran without coming back to a 10 ms timer "
            "(CPU time, so a busy machine does not count): what a slow handler would hold "
            "every other request for.",
            registry=self.registry,
        )
        self.request_success = Counter(
            "lanner:request_success",
            "Finished requests, by why they finished.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        # Speculative decoding (vLLM's names); the core sends cumulative counts.
        self.spec_decode_num_drafts = Counter(
            "lanner:spec_decode_num_drafts",
            "Verify steps of requests that proposed at least one token.",
            labels,
            registry=self.registry,
        )
        self.spec_decode_num_draft_tokens = Counter(
            "lanner:spec_decode_num_draft_tokens",
            "Proposed tokens.",
            labels,
            registry=self.registry,
        )
        self.spec_decode_num_accepted_tokens = Counter(
            "lanner:spec_decode_num_accepted_tokens",
            "Proposed tokens the target accepted.",
            labels,
            registry=self.registry,
        )
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            "lanner:spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens accepted, by their position in the draft (0 first).",
            [*labels, "position"],
            registry=self.registry,
        )
        for metric in (
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage,
            self.prefix_cache_hit_rate,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.prompt_tokens,
            self.generation_tokens,
            self.num_preemptions,
            self.spec_decode_num_drafts,
            self.spec_decode_num_draft_tokens,
            self.spec_decode_num_accepted_tokens,
        ):
            metric.labels(model_name)  # present (at zero) before the first request
        for reason in FINISHED_REASONS:
            self.request_success.labels(model_name, reason)

    # -- StatLogger --------------------------------------------------------------------

    def on_core_stats(self, stats: EngineCoreStats) -> None:
        self.num_requests_running.labels(self._model).set(stats.num_running)
        self.num_requests_waiting.labels(self._model).set(stats.num_waiting)
        self.kv_cache_usage.labels(self._model).set(stats.kv_cache_usage)
        queried = stats.prefix_cache_queried_tokens
        rate = stats.prefix_cache_hit_tokens / queried if queried else 0.0
        self.prefix_cache_hit_rate.labels(self._model).set(rate)
        # The core counts these from its start; each counter adds what grew since.
        self._add_growth(self.prefix_cache_queries, "queries", queried)
        self._add_growth(self.prefix_cache_hits, "hits", stats.prefix_cache_hit_tokens)
        self._add_growth(self.num_preemptions, "preemptions", stats.num_preemptions)
        self._add_growth(self.spec_decode_num_drafts, "drafts", stats.spec_num_drafts)
        self._add_growth(
            self.spec_decode_num_draft_tokens, "draft_tokens", stats.spec_num_draft_tokens
        )
        self._add_growth(
            self.spec_decode_num_accepted_tokens, "accepted", stats.spec_num_accepted_tokens
        )
        for position, total in enumerate(stats.spec_num_accepted_tokens_per_pos):
            self._add_growth(
                self.spec_decode_num_accepted_tokens_per_pos,
                f"accepted@{position}",
                total,
                str(position),
            )

    def _add_growth(self, counter: Counter, key: str, total: int, *labels: str) -> None:
        """Add to ``counter`` what the core's cumulative ``total`` grew by since last seen."""
        seen = self._seen.get(key, 0)
        if total > seen:
            counter.labels(self._model, *labels).inc(total - seen)
            self._seen[key] = total

    def on_routed(self, engine: str, reason: str) -> None:
        self.data_parallel_requests.labels(self._model, engine, reason).inc()

    def on_new_tokens(self, num_tokens: int, inter_token_latency: float | None) -> None:
        self.generation_tokens.labels(self._model).inc(num_tokens)
        if inter_token_latency is not None:
            self.inter_token_latency.labels(self._model).observe(inter_token_latency)

    def on_request_finished(self, output: RequestOutput) -> None:
        model = self._model
        metrics = output.metrics
        reason = output.outputs[0].finish_reason or "abort"
        self.request_success.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
        if metrics.time_to_first_token is not None:
            self.time_to_first_token.labels(model).observe(metrics.time_to_first_token)
        if metrics.time_per_output_token is not None:
            self.time_per_output_token.labels(model).observe(metrics.time_per_output_token)
        if metrics.finished_time is not None:
            self.e2e_request_latency.labels(model).observe(
                metrics.finished_time - metrics.arrival_time
            )
        if metrics.queue_time is not None:
            self.request_queue_time.labels(model).observe(metrics.queue_time)

    async def watch_event_loop(self, interval_s: float = 0.01) -> None:
        """Runs as a task for the server's life, timing each wake-up of a short sleep."""
        max_busy = 0.0
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(interval_s)
            self.event_loop_lag.observe(max(0.0, time.perf_counter() - wall - interval_s))
            busy = time.thread_time() - cpu
            if busy > max_busy:
                max_busy = busy
                self.event_loop_max_busy.set(busy)

    def render(self) -> bytes:
        text = generate_latest(self.registry)
        if self.prefix == "lanner":
            return text
        # Series are registered as lanner:*; only the metric names are renamed (each at
        # the start of a sample line or after "# HELP " / "# TYPE "), never label values.
        lines = []
        for line in text.split(b"\n"):
            for lead in (b"# HELP ", b"# TYPE ", b""):
                if line.startswith(lead + b"lanner:"):
                    line = lead + self.prefix.encode() + b":" + line[len(lead) + 7 :]
                    break
            lines.append(line)
        return b"\n".join(lines)
