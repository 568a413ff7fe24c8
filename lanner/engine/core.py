"""The engine core: owns the device, and loops schedule -> execute -> update."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

import torch

from lanner.engine.config import EngineConfig
from lanner.engine.request import PLACEHOLDER_TOKEN, FinishReason, Request
from lanner.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from lanner.engine.startup import format_phases, seconds_since_process_start
from lanner.memory.kv_cache import kv_cache_torch_dtype, num_blocks_for_memory
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.model.loader import load_model
from lanner.runner.cpu_threads import set_num_threads
from lanner.runner.model_runner import ModelRunner, PendingStep, SequenceChunk
from lanner.runner.sampler import SamplingRow, TokenLogprobs
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    # time.monotonic() when the request was first scheduled (queue time); sent once.
    scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _LaunchedStep:
    schedule: SchedulerOutput
    step: PendingStep


@dataclass
class EngineCoreStats:
    """The core's load, sent with its outputs for the server's gauges."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks requests hold, 0..1
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0  # since the core started


def validate_prompt(
    prompt_token_ids: list[int],
    max_model_len: int,
    vocab_size: int,
    model_max_len: int | None = None,
) -> None:
    """Raise ValueError saying what to change when a prompt cannot run. ``model_max_len``
    (the model's max_position_embeddings) says whether max_model_len could be raised."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt_token_ids) >= max_model_len:
        can_raise = model_max_len is not None and max_model_len < model_max_len
        fix = (
            f"shorten the prompt or raise max_model_len (the model allows {model_max_len})"
            if can_raise
            else "shorten the prompt (max_model_len is already the model's maximum)"
            if model_max_len is not None
            else "shorten the prompt or raise max_model_len, up to the model's maximum"
        )
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is "
            f"{max_model_len}, which must leave room for at least one generated "
            f"token; {fix}"
        )
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); check the "
            f"prompt_token_ids"
        )


def validate_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError naming the field when a request's token ids (logit_bias keys,
    allowed_token_ids, stop_token_ids) lie outside the vocabulary."""
    fields = {
        "logit_bias": list(params.logit_bias or ()),
        "allowed_token_ids": params.allowed_token_ids or [],
    }
    for name, ids in fields.items():
        outside = sorted({t for t in ids if not 0 <= t < vocab_size})
        if outside:
            raise ValueError(
                f"{name} has token ids {outside[:5]} outside the vocabulary of {vocab_size} "
                f"tokens ([0, {vocab_size}))"
            )


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        load = config.load
        started = time.perf_counter()
        # Where a cold start's time goes, logged once the engine is ready.
        self.startup_phases: dict[str, float] = {}
        before_build = seconds_since_process_start()
        if before_build is not None:
            self.startup_phases["process start to engine build (imports)"] = before_build
        self.loaded = load_model(
            load.model, load.dtype, load.device, load.load_format, load.revision, load.seed
        )
        self.model_config = self.loaded.config
        mark = self._mark_phase("load weights", started)
        self.num_threads = (
            set_num_threads(config.num_threads) if self.loaded.device.type == "cpu" else None
        )
        # vLLM's --seed: requests without a seed of their own draw from torch's generator,
        # so a run's unseeded sampling repeats under the same seed and request order.
        torch.manual_seed(load.seed)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model_config.max_position_embeddings}"
            )
        scheduler_config = config.scheduler_config(self.max_model_len)
        block_size = config.cache.block_size
        cache_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, self.loaded.dtype)
        self.runner = ModelRunner(
            self.loaded, block_size, cache_dtype, enforce_eager=config.enforce_eager
        )
        # Overlapped scheduling: prepare and launch step N+1 while the device runs N.
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.loaded.device.type == "cuda"
        )
        self._pending: _LaunchedStep | None = None
        peak = self.runner.profile_peak_memory(
            scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs
        )
        mark = self._mark_phase("profile run and kernel compile", mark)
        useful_blocks = scheduler_config.max_num_seqs * -(-self.max_model_len // block_size)
        num_blocks = num_blocks_for_memory(
            config.cache,
            self.model_config,
            cache_dtype,
            self.loaded.device,
            peak,
            useful_blocks,
        )
        self.runner.initialize_cache(num_blocks, scheduler_config.max_num_seqs, self.max_model_len)
        graphs = self.runner.decode_graphs
        capture = graphs.capture_seconds if graphs is not None else 0.0
        self._mark_phase("KV cache sizing and allocation", mark, less=capture)
        if graphs is not None:
            self.startup_phases["CUDA graph capture"] = capture
        self.kv_manager = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=config.cache.enable_prefix_caching
        )
        capacity = num_blocks * block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len "
                f"{self.max_model_len}; lower max_model_len or give the cache more memory"
            )
        self.scheduler = Scheduler(scheduler_config, self.kv_manager)
        logger.info(
            "engine ready in %.1fs on %s (%s, KV cache %s): %d blocks x %d = %d tokens, "
            "max concurrency %.1fx at %d tokens per request",
            time.perf_counter() - started,
            self.loaded.device,
            self.loaded.dtype,
            cache_dtype,
            num_blocks,
            block_size,
            capacity,
            capacity / self.max_model_len,
            self.max_model_len,
        )
        self.startup_phases["engine build"] = time.perf_counter() - started
        logger.info("startup: %s", format_phases(self.startup_phases))
        # Everything alive now (the model, the libraries' module state) lives as long as
        # the engine: out of the collector's view, a full collection while serving scans
        # only the requests' objects. Without this, each of W3's three full collections
        # held the host for ~80 ms, stalling the GPU (H100, 2026-11-27).
        gc.collect()
        gc.freeze()

    def _mark_phase(self, name: str, since: float, less: float = 0.0) -> float:
        now = time.perf_counter()
        self.startup_phases[name] = now - since - less
        return now

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.pool.num_blocks

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._pending is not None

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError saying what to change when a prompt cannot run."""
        validate_prompt(
            prompt_token_ids,
            self.max_model_len,
            self.model_config.vocab_size,
            self.model_config.max_position_embeddings,
        )

    def stats(self) -> EngineCoreStats:
        prefix = self.kv_manager.prefix_cache_stats
        return EngineCoreStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_manager.usage,
            prefix_cache_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_cache_hit_tokens=prefix.hit_tokens if prefix else 0,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def add_request(self, request: Request) -> None:
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Queue requests (a prompt's n samples) all or none: each is checked first."""
        ids = [r.request_id for r in requests]
        for request in requests:
            self.validate_prompt(request.prompt_token_ids)
            validate_token_ids(request.sampling_params, self.model_config.vocab_size)
            if request.request_id in self.scheduler.requests or ids.count(request.request_id) > 1:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            if not isinstance(request.priority, int) or isinstance(request.priority, bool):
                raise ValueError(f"priority must be an int, got {request.priority!r}")
        for request in requests:
            if not request.eos_token_ids:
                request.eos_token_ids = self.model_config.eos_token_ids
            self.scheduler.add_request(request)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block no request uses (e.g. after new weights are
        loaded). True when the cache ended empty; False when running requests still
        hold cached blocks, which then stay."""
        return self.kv_manager.reset_prefix_cache()

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.finish_request(request_id, FinishReason.ABORT)

    def step(self) -> list[EngineCoreOutput]:
        """Run one iteration; return what changed for each request it touched.

        With overlapped scheduling the step launched here runs on the device while the
        host reads and applies the previous one's results, so the outputs returned are
        one step behind the launches."""
        previous, self._pending = self._pending, None
        if previous is None or self._can_launch_ahead():
            self._pending = self._launch(previous)
        if previous is None and not self.async_scheduling and self._pending is not None:
            previous, self._pending = self._pending, None
        return self._collect(previous) if previous is not None else []

    def _can_launch_ahead(self) -> bool:
        """Launching before the previous step is read needs every sampler input known:
        penalties count the output tokens, so their requests make the engine wait."""
        if not self.async_scheduling:
            return False
        return not any(r.sampling_params.uses_output_history for r in self.scheduler.running)

    def _launch(self, previous: _LaunchedStep | None) -> _LaunchedStep | None:
        schedule = self.scheduler.schedule()
        if schedule.is_empty:
            return None
        now = time.monotonic()
        previous_rows = previous.step.sample_rows() if previous is not None else {}
        chunks = []
        for scheduled in schedule.scheduled:
            if scheduled.request.scheduled_time is None:
                scheduled.request.scheduled_time = now
            chunks.append(self._chunk(scheduled, previous_rows))
        launched = self.runner.launch(chunks, previous.step if previous is not None else None)
        # Tokens fed are computed once launched: the device runs steps in order. Each
        # sampled token holds a placeholder until the host reads the step.
        sampling = [s.request for s in schedule.scheduled if s.samples]
        self.scheduler.update_after_step(schedule)
        for request in sampling:
            request.output_token_ids.append(PLACEHOLDER_TOKEN)
            request.num_pending_outputs += 1
        return _LaunchedStep(schedule, launched)

    def _chunk(self, scheduled: ScheduledRequest, previous_rows: dict[str, int]) -> SequenceChunk:
        request = scheduled.request
        start = request.num_computed_tokens
        end = start + scheduled.num_new_tokens
        chunk = SequenceChunk(
            seq_id=request.request_id,
            token_ids=request.token_ids(start, end),
            start_position=start,
            block_table=self.kv_manager.get_block_table(request.request_id),
        )
        if PLACEHOLDER_TOKEN in chunk.token_ids:
            # Only a decode can feed a token still in flight: its own last sample.
            if len(chunk.token_ids) != 1 or request.request_id not in previous_rows:
                raise RuntimeError(
                    f"request {request.request_id} would feed an unread token at {start}"
                )
            chunk.token_from_previous = previous_rows[request.request_id]
        if scheduled.samples:
            chunk.sampling = SamplingRow(
                request.sampling_params,
                request.prompt_token_ids,
                request.output_token_ids,
                request.eos_token_ids,
            )
        if request.sampling_params.prompt_logprobs is not None:
            # Positions whose next-token logprob is still owed (none when recomputing
            # after preemption: they were collected the first time).
            first = max(start, len(request.prompt_logprobs))
            last = min(end, request.num_prompt_tokens - 1)
            if first < last:
                chunk.prompt_logprob_offset = first - start
                chunk.prompt_logprob_targets = request.prompt_token_ids[first + 1 : last + 1]
                chunk.prompt_logprob_top = request.sampling_params.prompt_logprobs
        return chunk

    def _collect(self, launched: _LaunchedStep) -> list[EngineCoreOutput]:
        """Read a launched step's results and apply them: fill each placeholder with its
        token, check stop conditions, and report what changed."""
        result = self.runner.collect(launched.step)
        outputs = []
        for scheduled in launched.schedule.scheduled:
            request = scheduled.request
            token = result.sampled_token_ids.get(request.request_id)
            if self.scheduler.requests.get(request.request_id) is not request:
                continue  # finished or aborted while this step ran: nothing to report
            out = EngineCoreOutput(request.request_id)
            if not request.scheduled_time_sent:
                out.scheduled_time = request.scheduled_time
            if request.request_id in result.prompt_logprobs:
                out.new_prompt_logprobs = result.prompt_logprobs[request.request_id]
                request.prompt_logprobs += out.new_prompt_logprobs
            if token is not None:
                slot = request.num_output_tokens - request.num_pending_outputs
                request.output_token_ids[slot] = token
                request.num_pending_outputs -= 1
                out.new_token_ids.append(token)
                if request.request_id in result.logprobs:
                    out.new_logprobs.append(result.logprobs[request.request_id])
                stop = self.scheduler.check_stop(request)
                if stop is not None:
                    # A step launched after this one may have sampled past the end.
                    del request.output_token_ids[slot + 1 :]
                    request.num_pending_outputs = 0
                    out.finish_reason, out.stop_reason = stop
                    self.scheduler.finish_request(request.request_id, *stop)
            if out.new_token_ids or out.new_prompt_logprobs or out.finished:
                request.scheduled_time_sent = True
                outputs.append(out)
        return outputs

    @torch.inference_mode()
    def shutdown(self) -> None:
        self.abort_requests(list(self.scheduler.requests))
        self._pending = None
        self.runner.kv_caches = []
        gc.unfreeze()  # what the engine held may now be collected, cycles included
