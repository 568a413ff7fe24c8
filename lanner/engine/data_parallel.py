"""Data-parallel fan-out: N engine cores (one per GPU; on the CPU, N processes) behind one
front end, each request sent to one core by a routing policy (engine/routing.py).

DataParallelAsyncLLM offers what AsyncLLM offers the server, so the HTTP layer does not
know how many cores there are. Only the server imports this module (as AsyncLLM).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any

from lanner.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream, StatLogger
from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCoreStats
from lanner.engine.core_messages import CoreReady
from lanner.engine.outputs import RequestOutput
from lanner.engine.routing import RoutingPolicy, WorkerLoad, make_policy, token_key
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["DataParallelAsyncLLM", "make_engine"]


def make_engine(
    config: EngineConfig,
    stat_logger: StatLogger | None = None,
    data_parallel_size: int = 1,
    policy: str = "cache_aware",
) -> AsyncLLM | DataParallelAsyncLLM:
    """The server's engine: one core, or `data_parallel_size` of them."""
    if data_parallel_size == 1:
        return AsyncLLM(config, stat_logger=stat_logger)
    return DataParallelAsyncLLM(config, data_parallel_size, make_policy(policy), stat_logger)


def core_environments(config: EngineConfig, size: int) -> list[dict[str, str]]:
    """What each rank's core process gets in its environment: its own GPU on CUDA (its
    tensor_parallel_size GPUs under tensor parallelism); on the CPU, its share of the
    cores (N processes each using every core would thrash)."""
    import torch

    tp = config.parallel.tensor_parallel_size
    device = config.load.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(
                f"--data-parallel-size {size} gives each rank its own GPU; pass --device "
                f"cuda, not {device!r} (CUDA_VISIBLE_DEVICES picks which GPUs)"
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = (
            [g.strip() for g in visible.split(",") if g.strip()]
            if visible is not None
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        if len(gpus) < size * tp:
            raise ValueError(
                f"--data-parallel-size {size} with --tensor-parallel-size {tp} needs "
                f"{size * tp} GPUs, but {len(gpus)} are visible ({gpus}); lower them or set "
                f"CUDA_VISIBLE_DEVICES"
            )
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(gpus[rank * tp : (rank + 1) * tp])}
            for rank in range(size)
        ]
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(size)]
    threads = str(max(1, (os.cpu_count() or 1) // size))
    return [{"OMP_NUM_THREADS": threads} for _ in range(size)]


class _RankStatLogger:
    """One rank's view of the server's stat logger: core gauges are summed over the ranks
    before they reach it (each rank alone would overwrite the others' values)."""

    def __init__(self, parent: DataParallelAsyncLLM, rank: int) -> None:
        self.parent = parent
        self.rank = rank

    def on_core_stats(self, stats: EngineCoreStats) -> None:
        self.parent._on_rank_stats(self.rank, stats)

    def on_new_tokens(self, num_tokens: int, inter_token_latency: float | None) -> None:
        if self.parent.stat_logger is not None:
            self.parent.stat_logger.on_new_tokens(num_tokens, inter_token_latency)

    def on_request_finished(self, output: RequestOutput) -> None:
        if self.parent.stat_logger is not None:
            self.parent.stat_logger.on_request_finished(output)


def sum_stats(all_stats: list[EngineCoreStats]) -> EngineCoreStats:
    """The ranks' load as one core's: counts add up (lists position by position), KV usage
    is the mean share (every rank has the same cache size)."""
    summed: dict[str, Any] = {}
    for stat_field in dataclasses.fields(EngineCoreStats):
        values = [getattr(s, stat_field.name) for s in all_stats]
        if stat_field.name == "kv_cache_usage":
            summed[stat_field.name] = sum(values) / len(values)
        elif values and isinstance(values[0], list):
            width = max(len(v) for v in values)
            summed[stat_field.name] = [
                sum(v[i] for v in values if i < len(v)) for i in range(width)
            ]
        else:
            summed[stat_field.name] = sum(values)
    return EngineCoreStats(**summed)


class DataParallelAsyncLLM:
    """N AsyncLLMs, each driving its own engine core; a request goes to one of them."""

    def __init__(
        self,
        config: EngineConfig,
        data_parallel_size: int,
        policy: RoutingPolicy,
        stat_logger: StatLogger | None = None,
    ) -> None:
        if data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {data_parallel_size}")
        self.config = config
        self.policy = policy
        self.stat_logger = stat_logger
        environments = core_environments(config, data_parallel_size)
        self._rank_stats = [EngineCoreStats() for _ in range(data_parallel_size)]
        self.engines = [
            AsyncLLM(config, stat_logger=_RankStatLogger(self, rank), core_env=environment)
            for rank, environment in enumerate(environments)
        ]

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every core at once (each loads its own copy of the model)."""
        results = await asyncio.gather(
            *(engine.start() for engine in self.engines), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def shutdown(self) -> None:
        await asyncio.gather(*(engine.shutdown() for engine in self.engines))

    @property
    def ready(self) -> CoreReady | None:
        return self.engines[0].ready if all(e.ready for e in self.engines) else None

    @property
    def tokenizer(self) -> Any:
        return self.engines[0].tokenizer

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return self.engines[0].generation_defaults

    @property
    def is_dead(self) -> bool:
        """Dead when no core can serve; while one lives, requests go to the live ones."""
        return all(engine.is_dead for engine in self.engines)

    @property
    def max_model_len(self) -> int:
        return self.engines[0].max_model_len

    @property
    def num_unfinished_requests(self) -> int:
        return sum(e.num_unfinished_requests for e in self.engines if e.processor is not None)

    @property
    def num_unfinished_sequences(self) -> int:
        return sum(e.num_unfinished_sequences for e in self.engines if e.processor is not None)

    @property
    def stats(self) -> EngineCoreStats:
        return sum_stats(self._rank_stats)

    # -- requests ------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        self.engines[0].validate_prompt(prompt_token_ids)

    def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue the request on the rank the policy picks (AsyncLLM.generate's contract)."""
        live = [rank for rank, engine in enumerate(self.engines) if not engine.is_dead]
        if not live:
            raise EngineDeadError("every engine core process has stopped")
        if any(e.processor is not None and request_id in e.processor.states for e in self.engines):
            raise ValueError(f"request id {request_id!r} is already in use")
        candidates = [
            WorkerLoad(
                str(rank),
                self.engines[rank].num_unfinished_requests,
                self.engines[rank].stats.num_waiting,
            )
            for rank in live
        ]
        decision = self.policy.choose(candidates, token_key(prompt_token_ids))
        rank = int(decision.worker)
        stream = self.engines[rank].generate(
            request_id, prompt, prompt_token_ids, params, priority, arrival_time
        )
        on_routed = getattr(self.stat_logger, "on_routed", None)
        if on_routed is not None:
            on_routed(decision.worker, decision.reason)
        return stream

    def abort(self, request_id: str) -> None:
        """Abort on whichever rank holds the request (a no-op on the others)."""
        for engine in self.engines:
            engine.abort(request_id)

    async def reset_prefix_cache(self) -> bool:
        emptied = await asyncio.gather(*(e.reset_prefix_cache() for e in self.engines))
        self.policy.reset()  # what it learned about the caches no longer holds
        return all(emptied)

    # -- stats ---------------------------------------------------------------------------

    def _on_rank_stats(self, rank: int, stats: EngineCoreStats) -> None:
        self._rank_stats[rank] = stats
        if self.stat_logger is not None:
            self.stat_logger.on_core_stats(self.stats)
