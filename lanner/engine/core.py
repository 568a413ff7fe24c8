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
from lanner.engine.structured_output import RequestGrammar, StructuredOutputManager
from lanner.memory.kv_cache import kv_cache_torch_dtype, num_blocks_for_memory
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.model.loader import load_model
from lanner.runner.cpu_threads import set_num_threads
from lanner.runner.executor import TensorParallelExecutor, start_executor
from lanner.runner.model_runner import (
    DeviceDrafts,
    ModelRunner,
    PendingStep,
    SequenceChunk,
    StartupShape,
)
from lanner.runner.sampler import SamplingRow, TokenLogprobs
from lanner.runner.worker import WorkerSpec
from lanner.sampling_params import SamplingParams
from lanner.spec.factory import SpeculativeDecoding
from lanner.spec.policy import RequestSpecState
from lanner.spec.proposer import ProposalSlot

logger = logging.getLogger(__name__)

# How long an idle step waits on a compiling grammar before returning to its caller.
GRAMMAR_POLL_S = 0.005
# Decode-graph rows captured beyond the decodes' own, for a prefill chunk beside them: a
# held-out W7 prompt (256 tokens) refilling a batch fits.
PREFILL_GRAPH_ROWS = 256


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
    # request id -> drafts verified in this step (speculation)
    num_drafts: dict[str, int] = field(default_factory=dict)
    # Speculation: the running requests and the draft length the step was planned at,
    # and whether every request in it decoded (so that its time measures that kind).
    num_running: int = 0
    draft_length: int = 0
    all_decodes: bool = False


@dataclass
class EngineCoreStats:
    """The core's load, sent with its outputs for the server's gauges."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks requests hold, 0..1
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0  # since the core started
    # Speculative decoding, cumulative (vLLM's spec_decode counters); zero when off.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


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


def worker_spec(config: EngineConfig) -> WorkerSpec:
    """What the tensor-parallel workers need to build their slices of the model."""
    load = config.load
    return WorkerSpec(
        world_size=config.parallel.tensor_parallel_size,
        load_options={
            "model": load.model,
            "dtype": load.dtype,
            "device": load.device,
            "load_format": load.load_format,
            "revision": load.revision,
            "seed": load.seed,
            "quantization": load.quantization,
        },
        cache=config.cache,
        enforce_eager=config.enforce_eager,
        timeout_s=config.parallel.distributed_timeout_s,
    )


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Tensor parallelism: this process is rank 0; the executor runs the other ranks.
        self.executor: TensorParallelExecutor | None = None
        if config.parallel.tensor_parallel_size > 1:
            self.executor = start_executor(config.parallel, worker_spec(config))
        try:
            self._start(config)
        except BaseException:
            if self.executor is not None:
                self.executor.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        load = config.load
        started = time.perf_counter()
        executor = self.executor
        # Where a cold start's time goes, logged once the engine is ready.
        self.startup_phases: dict[str, float] = {}
        before_build = seconds_since_process_start()
        if before_build is not None:
            self.startup_phases["process start to engine build (imports)"] = before_build
        self.loaded = load_model(
            load.model,
            load.dtype,
            executor.device if executor is not None else load.device,
            load.load_format,
            load.revision,
            load.seed,
            quantization=load.quantization,
            shard=executor.shard if executor is not None else None,
            group=executor.group if executor is not None else None,
        )
        if executor is not None:
            executor.wait_ready()
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
        # Speculative decoding: the proposer (a draft model loads here) and the
        # rejection sampler that takes the target's sampler's place.
        self.spec: SpeculativeDecoding | None = None
        if config.speculative_config is not None:
            self.spec = SpeculativeDecoding.build(
                config.speculative_config,
                self.loaded,
                config.cache.kv_cache_dtype,
                block_size,
                self.max_model_len,
                config.enforce_eager,
                load.load_format,
                load.seed,
            )
        # Structured outputs: grammars compile on a thread of their own when asked for.
        self.structured_outputs = StructuredOutputManager(
            load.tokenizer or self.loaded.path,
            self.model_config.vocab_size,
            tuple(self.model_config.eos_token_ids),
            pin_memory=self.loaded.device.type == "cuda",
        )
        self._compiling: list[Request] = []  # requests whose grammar is not ready yet
        self.runner = ModelRunner(
            self.loaded,
            block_size,
            cache_dtype,
            enforce_eager=config.enforce_eager,
            sampler=self.spec.sampler if self.spec is not None else None,
        )
        # Overlapped scheduling: prepare and launch step N+1 while the device runs N.
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.loaded.device.type == "cuda"
        )
        self._pending: _LaunchedStep | None = None
        num_spec_tokens = self.spec.num_speculative_tokens if self.spec is not None else 0
        useful_blocks = scheduler_config.max_num_seqs * -(-self.max_model_len // block_size)

        def size_cache() -> int:
            peak = self.runner.profile_peak_memory(
                scheduler_config.max_num_batched_tokens,
                scheduler_config.max_num_seqs,
                self.max_model_len,
                num_spec_tokens,
            )
            return num_blocks_for_memory(
                config.cache,
                self.model_config,
                cache_dtype,
                self.loaded.device,
                peak,
                useful_blocks,
                self.spec.proposer.kv_cache_bytes_per_block() if self.spec is not None else 0,
                num_kv_heads=self.loaded.num_kv_heads,
            )

        max_num_seqs = scheduler_config.max_num_seqs
        # A verified token is one row of the decode graphs: k + 2 rows a request at most
        # (one more after a full acceptance). With room for a prefill chunk beside them
        # (PREFILL_GRAPH_ROWS), a refill among running decodes replays a graph too (its
        # chunk as one-token rows: ModelRunner._flattens_prefills); up to 512 rows, as
        # vLLM captures.
        decode_rows = max_num_seqs * (num_spec_tokens + 2 if num_spec_tokens else 1)
        prefill_rows = PREFILL_GRAPH_ROWS if max_num_seqs > 1 else 0
        graph_rows = max(
            max_num_seqs,
            min(decode_rows + prefill_rows, 512, scheduler_config.max_num_batched_tokens),
        )
        # Every kernel the profile run and the graph captures launch, compiled or loaded on
        # a pool of threads first (else one at a time, as each first launches); what
        # compiles until the block ends goes into the kernel manifest for the next start.
        # (Not under tensor parallelism: each rank compiles as its kernels first launch.)
        startup_kernels = self.runner.startup_kernels(
            StartupShape(
                scheduler_config.max_num_batched_tokens,
                max_num_seqs,
                self.max_model_len,
                num_spec_tokens,
                graph_rows,
            ),
            {"speculative_config": repr(config.speculative_config)},
            enabled=executor is None,
        )
        with startup_kernels as how:
            if how == "kernel manifest":
                mark = self._mark_phase("kernel load (manifest)", mark)
            elif how != "off":
                mark = self._mark_phase("kernel compile (parallel)", mark)
            # Under tensor parallelism every rank sizes its own cache; the smallest wins.
            num_blocks = (
                size_cache()
                if executor is None
                else executor.num_blocks(
                    size_cache,
                    scheduler_config.max_num_batched_tokens,
                    scheduler_config.max_num_seqs,
                    self.max_model_len,
                    num_spec_tokens,
                    useful_blocks,
                )
            )
            mark = self._mark_phase("profile run, kernel compile and KV cache sizing", mark)
            # The proposer's caches first: the target's graphs, captured next, may write
            # into one (an EAGLE head's feature cache).
            if self.spec is not None:
                self.spec.proposer.initialize_cache(num_blocks, max_num_seqs, self.max_model_len)
            if executor is None:
                self.runner.initialize_cache(
                    num_blocks, max_num_seqs, self.max_model_len, graph_rows
                )
            else:
                executor.initialize_cache(
                    self.runner, num_blocks, max_num_seqs, self.max_model_len, graph_rows
                )
                executor.attach(self.runner)
        graphs = self.runner.decode_graphs
        capture = graphs.capture_seconds if graphs is not None else 0.0
        self._mark_phase("KV cache allocation", mark, less=capture)
        if graphs is not None:
            self.startup_phases["CUDA graph capture"] = capture
            logger.info("startup phase: CUDA graph capture %.2f s", capture)
        self.kv_manager = KVCacheManager(
            num_blocks, block_size, enable_prefix_caching=config.cache.enable_prefix_caching
        )
        capacity = num_blocks * block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len "
                f"{self.max_model_len}; lower max_model_len or give the cache more memory"
            )
        self.scheduler = Scheduler(
            scheduler_config,
            self.kv_manager,
            self.spec.draft_length if self.spec is not None else None,
        )
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
        # Logged as each phase ends, so a start that hangs or is killed says how far it got.
        logger.info("startup phase: %s %.2f s", name, self.startup_phases[name])
        return now

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.pool.num_blocks

    def check_workers(self) -> None:
        """Raise WorkerFailedError when a tensor-parallel worker has failed (also while
        the engine is idle, so the server reports it before a request arrives)."""
        if self.executor is not None:
            self.executor.check()

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
        stats = EngineCoreStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_manager.usage,
            prefix_cache_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_cache_hit_tokens=prefix.hit_tokens if prefix else 0,
            num_preemptions=self.scheduler.num_preemptions,
        )
        if self.spec is not None:
            spec = self.spec.policy.stats
            stats.spec_num_drafts = spec.num_drafts
            stats.spec_num_draft_tokens = spec.num_draft_tokens
            stats.spec_num_accepted_tokens = spec.num_accepted_tokens
            stats.spec_num_accepted_tokens_per_pos = list(spec.num_accepted_tokens_per_pos)
        return stats

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
            if self.spec is not None and request.spec_state is None:
                request.spec_state = RequestSpecState()
            constraint = request.sampling_params.structured_outputs
            if constraint is not None and request.grammar is None:
                request.grammar = self.structured_outputs.grammar_for(constraint)
                self._compiling.append(request)
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
        early = self._end_failed_grammars()
        draft_length = self._plan()
        if previous is None or self._can_launch_ahead(draft_length):
            self._pending = self._launch(previous, draft_length)
        if (
            previous is None
            and self._pending is not None
            and not self._can_launch_ahead(self._pending.draft_length)
        ):
            # Nothing may run ahead of this step: read it now.
            previous, self._pending = self._pending, None
        if previous is None and self._pending is None and self._compiling:
            # Only grammars to wait for: give their thread the interpreter a moment
            # rather than spin (the caller calls again).
            self._compiling[0].grammar.wait(GRAMMAR_POLL_S)  # type: ignore[union-attr]
        outputs = []
        deferred = self._pending if self._pending and self._pending.step.deferred else None
        if previous is not None:
            self._launch_deferred_sampling(previous)  # (when no step was launched after it)
            # Its rows read outputs (or a grammar state) the step read now gives.
            outputs = self._collect(previous, deferred)
        if deferred is not None:
            self._trim_deferred_rows(deferred)
            if self.structured_outputs.fill_done():
                # Its bitmasks are filled (here, for a few rows; or the fill thread is
                # done): its sampling goes to the device now, not after the next step's
                # scheduling, which the device would otherwise wait for once it has run
                # the step's model (at batch 1 it waited on this path).
                self._launch_deferred_sampling(deferred)
        return early + outputs

    def _trim_deferred_rows(self, launched: _LaunchedStep) -> None:
        """The step before has been read: the launched step's sampling rows see their
        output history without the token this step samples (its placeholder). Their
        grammar bitmasks are filling (``_collect``); ``_launch_deferred_sampling``
        launches the sampling once they are: at the end of this step when the fill is
        done by then, else just before the next step's model."""
        assert launched.step.deferred is not None
        for chunk in launched.step.deferred.chunks:
            row = chunk.sampling
            outputs = row.output_token_ids if row is not None else None
            if outputs and outputs[-1] == PLACEHOLDER_TOKEN:
                # Counted off, not copied: nothing appends to the list before the row's
                # sampling launches (the next step's placeholders come after it).
                row.num_pending = 1  # type: ignore[union-attr]

    def _launch_deferred_sampling(self, launched: _LaunchedStep) -> None:
        """Launch a deferred step's sampling once its bitmasks are filled (no-op for a
        step that sampled when launched, or whose sampling is launched already)."""
        if launched.step.deferred is None:
            return
        # The sampler waits for the fill only once the rest of its host work is done.
        self.runner.sample_deferred(launched.step, self.structured_outputs.wait_for_fill)
        self.structured_outputs.wait_for_fill()  # (rows without bitmasks never asked)

    def _end_failed_grammars(self) -> list[EngineCoreOutput]:
        """Requests whose grammar failed to compile end here, as aborted; the others
        leave the compiling list once ready (the scheduler admits them then)."""
        if not self._compiling:
            return []
        outputs = []
        still = []
        for request in self._compiling:
            grammar = request.grammar
            assert grammar is not None
            if not grammar.ready:
                still.append(request)
            elif grammar.error is not None:
                logger.warning(
                    "request %s: its grammar failed: %s", request.request_id, grammar.error
                )
                if self.scheduler.finish_request(request.request_id, FinishReason.ABORT):
                    outputs.append(
                        EngineCoreOutput(request.request_id, finish_reason=FinishReason.ABORT)
                    )
        self._compiling = still
        return outputs

    def _plan(self) -> int:
        """The draft length the next step would speculate with (0: none)."""
        if self.spec is None:
            return 0
        return self.spec.policy.plan(len(self.scheduler.running))

    def _can_launch_ahead(self, draft_length: int) -> bool:
        """Whether a step may launch before the previous one is read: not one that
        speculates (proposals start from the last accepted token, and the tokens a step
        yields are known only once it is read). Requests whose sampling reads their
        outputs (penalties, bad words, a grammar) launch their model ahead and sample once
        the previous step is read (``_launch_deferred_sampling``)."""
        return self.async_scheduling and not draft_length

    def _launch(self, previous: _LaunchedStep | None, draft_length: int) -> _LaunchedStep | None:
        num_running = len(self.scheduler.running)
        if self.spec is not None:
            self.spec.policy.begin_step(num_running, draft_length)
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
        drafts: DeviceDrafts | None = None
        num_drafts: dict[str, int] = {}
        if self.spec is not None:
            if draft_length:
                drafts, num_drafts = self._propose(schedule, chunks)
            else:
                self.spec.proposer.idle(chunks)
        # Rows reading outputs of the step still in flight sample once it is read.
        defer = previous is not None and any(
            s.samples and s.request.sampling_params.uses_output_history for s in schedule.scheduled
        )
        if not defer:
            self._fill_grammar_bitmasks(schedule, chunks, drafts)
        # This step's host work first: a deferred sampling may wait for its bitmasks.
        prepared = self.runner.prepare(chunks)
        if previous is not None:
            # The device gets this step after the previous one's sampling: it feeds on it.
            self._launch_deferred_sampling(previous)
        launched = self.runner.launch(
            chunks, previous.step if previous is not None else None, drafts, defer, prepared
        )
        # Tokens fed are computed once launched: the device runs steps in order. Each
        # sampled token holds a placeholder until the host reads the step.
        sampling = [s.request for s in schedule.scheduled if s.samples]
        self.scheduler.update_after_step(schedule)
        for request in sampling:
            request.output_token_ids.append(PLACEHOLDER_TOKEN)
            request.num_pending_outputs += 1
        all_decodes = not schedule.preempted and all(
            s.samples and s.num_known_new_tokens == 1 for s in schedule.scheduled
        )
        return _LaunchedStep(schedule, launched, num_drafts, num_running, draft_length, all_decodes)

    def _fill_grammar_bitmasks(
        self,
        schedule: SchedulerOutput,
        chunks: list[SequenceChunk],
        device_drafts: DeviceDrafts | None,
        background: bool = False,
    ) -> None:
        """Each sampling row under a grammar gets its bitmasks (the next token's, and one
        after each draft), filled for the whole batch at once into one buffer (on the fill
        thread with ``background``: then wait_for_fill before sampling); their matchers
        are up to date (a step launched before the one it follows was read fills them once
        that is, in ``_collect``). Drafts still on the device are read here, only for
        these requests."""
        rows = self._grammar_rows(schedule, chunks)
        if not rows:
            return
        drafts: list[tuple[int, ...] | list[int]] = []
        for chunk, _ in rows:
            count = chunk.num_draft_tokens
            if not count:
                drafts.append(())
            elif chunk.draft_row is not None and device_drafts is not None:
                drafts.append(device_drafts.token_ids[chunk.draft_row, :count].tolist())
            else:
                drafts.append(list(chunk.token_ids[-count:]))
        grammars: list[RequestGrammar] = [grammar for _, grammar in rows]  # type: ignore[misc]
        if background:
            assert not any(drafts), "a step that verifies drafts is never launched ahead"
            bitmasks = self.structured_outputs.start_fill(grammars)
        else:
            bitmasks = self.structured_outputs.fill_bitmasks(grammars, drafts)
        for (chunk, _), bitmask in zip(rows, bitmasks, strict=True):
            assert chunk.sampling is not None
            chunk.sampling.token_bitmask = bitmask

    def _grammar_rows(
        self, schedule: SchedulerOutput, chunks: list[SequenceChunk]
    ) -> list[tuple[SequenceChunk, RequestGrammar]]:
        """The step's sampling rows under a grammar that has not ended, with it."""
        return [
            (chunk, scheduled.request.grammar)
            for scheduled, chunk in zip(schedule.scheduled, chunks, strict=True)
            if chunk.sampling is not None
            and scheduled.request.grammar is not None
            # (A request the step before finished samples no more: its grammar is done.)
            and self.scheduler.requests.get(scheduled.request.request_id) is scheduled.request
            and not scheduled.request.grammar.is_terminated
        ]

    def _propose(
        self, schedule: SchedulerOutput, chunks: list[SequenceChunk]
    ) -> tuple[DeviceDrafts | None, dict[str, int]]:
        """Ask the proposer for each request's drafts and append them to its chunk.
        Returns the drafts still on the device, and how many each request got."""
        assert self.spec is not None
        slots = [
            ProposalSlot(
                chunk.seq_id,
                chunk,
                scheduled.num_draft_tokens,
                scheduled.request.token_ids,
                scheduled.request.num_known_tokens,
                scheduled.request.spec_state,  # type: ignore[arg-type]
                scheduled.request.num_preemptions,
            )
            for scheduled, chunk in zip(schedule.scheduled, chunks, strict=True)
        ]
        proposal = self.spec.proposer.propose(slots)
        num_drafts: dict[str, int] = {}
        for index, (slot, tokens) in enumerate(zip(slots, proposal.token_ids, strict=True)):
            if not slot.num_draft_slots:
                continue
            tokens = tokens[: slot.num_draft_slots]
            num_drafts[slot.seq_id] = len(tokens)
            if tokens:
                chunk = slot.chunk
                chunk.token_ids += tokens
                chunk.num_draft_tokens = len(tokens)
                if proposal.device_rows:
                    chunk.draft_row = proposal.device_rows[index]
        return proposal.device, num_drafts

    def _chunk(self, scheduled: ScheduledRequest, previous_rows: dict[str, int]) -> SequenceChunk:
        request = scheduled.request
        start = request.num_computed_tokens
        end = start + scheduled.num_known_new_tokens
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

    def _collect(
        self, launched: _LaunchedStep, deferred: _LaunchedStep | None = None
    ) -> list[EngineCoreOutput]:
        """Read a launched step's results and apply them: fill each placeholder with its
        token, check stop conditions, and report what changed. The grammars advance
        first: then the bitmasks of ``deferred`` (the step launched after this one, its
        sampling deferred) start filling on the fill thread while the rest is applied
        and the next step scheduled, the device running that step's model meanwhile.
        When that fill is the fill thread's (``fills_on_thread``), that thread
        advances the grammars too, first, while this one applies the step: a sampled
        token ends its grammar only if it is one of the grammar's stop tokens (the mask
        allowed it), and what the grammars answered is checked once the step is applied
        (``_confirm_advance``)."""
        result = self.runner.collect(launched.step)
        requests, advancing = self._grammars_to_advance(launched.schedule, result.sampled_token_ids)
        rows: list[tuple[SequenceChunk, RequestGrammar]] = []
        if deferred is not None and requests:
            assert deferred.step.deferred is not None
            rows = self._grammar_rows(deferred.schedule, deferred.step.deferred.chunks)
        handed_over = self.structured_outputs.fills_on_thread(len(rows))
        if handed_over:
            grammars: list[RequestGrammar] = [r.grammar for r in requests]  # type: ignore[misc]
            bitmasks = self.structured_outputs.start_fill(
                [grammar for _, grammar in rows], grammars, advancing
            )
            for (chunk, _), bitmask in zip(rows, bitmasks, strict=True):
                assert chunk.sampling is not None
                chunk.sampling.token_bitmask = bitmask
            grammar_stops = {
                request.request_id: (FinishReason.STOP, None) if grammar.ends_on(token) else None
                for request, grammar, token in zip(requests, grammars, advancing, strict=True)
            }
        else:
            grammar_stops = self._advance_grammars(requests, advancing)
            if deferred is not None:
                assert deferred.step.deferred is not None
                chunks = deferred.step.deferred.chunks
                self._fill_grammar_bitmasks(deferred.schedule, chunks, None, background=True)
        outputs = []
        for scheduled in launched.schedule.scheduled:
            request = scheduled.request
            tokens = result.sampled_token_ids.get(request.request_id)
            if self.scheduler.requests.get(request.request_id) is not request:
                continue  # finished or aborted while this step ran: nothing to report
            out = EngineCoreOutput(request.request_id)
            if not request.scheduled_time_sent:
                out.scheduled_time = request.scheduled_time
            if request.request_id in result.prompt_logprobs:
                out.new_prompt_logprobs = result.prompt_logprobs[request.request_id]
                request.prompt_logprobs += out.new_prompt_logprobs
            if tokens is not None:
                if scheduled.num_draft_tokens:
                    self._accept_drafts(
                        request,
                        scheduled.num_draft_tokens,
                        launched.num_drafts.get(request.request_id, 0),
                        len(tokens) - 1,
                    )
                self._append_tokens(
                    request,
                    tokens,
                    result.logprobs.get(request.request_id),
                    out,
                    grammar_stops.get(request.request_id),
                )
            if out.new_token_ids or out.new_prompt_logprobs or out.finished:
                request.scheduled_time_sent = True
                outputs.append(out)
        if handed_over:
            self._confirm_advance(requests, advancing, outputs)
        if self.spec is not None:
            self.spec.policy.step_done(
                launched.num_running,
                launched.draft_length,
                launched.all_decodes,
                self._spec_states,
                sum(map(len, result.sampled_token_ids.values())),
            )
        return outputs

    def _grammars_to_advance(
        self, schedule: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> tuple[list[Request], list[int]]:
        """The requests under a grammar that sampled one token (no drafts), and those
        tokens."""
        requests, tokens = [], []
        for scheduled in schedule.scheduled:
            request = scheduled.request
            sampled_tokens = sampled.get(request.request_id)
            if (
                request.grammar is not None
                and sampled_tokens is not None
                and len(sampled_tokens) == 1
                and self.scheduler.requests.get(request.request_id) is request
            ):
                requests.append(request)
                tokens.append(sampled_tokens[0])
        return requests, tokens

    def _advance_grammars(
        self, requests: list[Request], tokens: list[int]
    ) -> dict[str, tuple[FinishReason, None] | None]:
        """Feed each request's grammar its token, all at once; what ``_grammar_stop``
        said, by request id."""
        if not requests:
            return {}
        grammars: list[RequestGrammar] = [r.grammar for r in requests]  # type: ignore[misc]
        accepted = RequestGrammar.accept_each(grammars, tokens)
        return {
            request.request_id: self._grammar_stop(request, token, ok)
            for request, token, ok in zip(requests, tokens, accepted, strict=True)
        }

    def _confirm_advance(
        self, requests: list[Request], tokens: list[int], outputs: list[EngineCoreOutput]
    ) -> None:
        """What the grammars the fill thread advanced answered: a request whose grammar
        refused its token (which its mask allowed: never, but for a fault) ends here,
        aborted, as ``_grammar_stop`` would have ended it; one that has ended already
        (its token was a stop token, or a limit) keeps its end, and the fault is logged."""
        accepted = self.structured_outputs.wait_for_advance()
        for request, token, ok in zip(requests, tokens, accepted, strict=True):
            if ok:
                continue
            logger.error("request %s: its grammar refused token %d", request.request_id, token)
            if self.scheduler.requests.get(request.request_id) is not request:
                continue
            del request.output_token_ids[request.num_output_tokens - request.num_pending_outputs :]
            request.num_pending_outputs = 0
            self.scheduler.finish_request(request.request_id, FinishReason.ABORT)
            out = next((o for o in outputs if o.request_id == request.request_id), None)
            if out is None:
                out = EngineCoreOutput(request.request_id)
                outputs.append(out)
            out.finish_reason, out.stop_reason = FinishReason.ABORT, None

    def _spec_states(self) -> list[RequestSpecState]:
        return [r.spec_state for r in self.scheduler.running if r.spec_state is not None]

    def _accept_drafts(
        self, request: Request, num_requested: int, num_drafts: int, num_accepted: int
    ) -> None:
        assert self.spec is not None and request.spec_state is not None
        self.spec.policy.observe(request.spec_state, num_requested, num_drafts, num_accepted)
        self.scheduler.accept_draft_tokens(request, num_accepted)

    def _append_tokens(
        self,
        request: Request,
        tokens: list[int],
        logprobs: list[TokenLogprobs] | None,
        out: EngineCoreOutput,
        grammar_stop: tuple[FinishReason, None] | None = None,
    ) -> None:
        """Put a step's new tokens in place (the first fills the step's placeholder),
        checking the stop conditions after each: an EOS, stop token or length limit
        inside a verified run ends the request there. A lone token the grammar has
        taken already (``_advance_grammars``) comes with what that said."""
        advanced = len(tokens) == 1 and request.grammar is not None
        slot = request.num_output_tokens - request.num_pending_outputs
        for index, token in enumerate(tokens):
            if index == 0:
                request.output_token_ids[slot] = token
                request.num_pending_outputs -= 1
            else:  # only a verify step gives several: nothing is in flight after it
                request.output_token_ids.insert(slot + index, token)
            out.new_token_ids.append(token)
            if logprobs is not None:
                out.new_logprobs.append(logprobs[index])
            stop = self.scheduler.check_stop(request)
            if advanced:
                stop = stop or grammar_stop
            elif request.grammar is not None:
                stop = stop or self._advance_grammar(request, token)
            if stop is not None:
                # A step launched after this one may have sampled past the end.
                del request.output_token_ids[slot + index + 1 :]
                request.num_pending_outputs = 0
                out.finish_reason, out.stop_reason = stop
                self.scheduler.finish_request(request.request_id, *stop)
                return

    def _advance_grammar(self, request: Request, token: int) -> tuple[FinishReason, None] | None:
        """Feed the grammar the request's new token; the request ends when the grammar
        has (it took a stop token), or, should it refuse the token, is aborted."""
        grammar = request.grammar
        assert grammar is not None
        return self._grammar_stop(request, token, grammar.accept(token))

    @staticmethod
    def _grammar_stop(
        request: Request, token: int, accepted: bool
    ) -> tuple[FinishReason, None] | None:
        """What the grammar's taking (or refusing) ``token`` means for the request."""
        if not accepted:
            logger.error("request %s: its grammar refused token %d", request.request_id, token)
            return FinishReason.ABORT, None
        assert request.grammar is not None
        return (FinishReason.STOP, None) if request.grammar.is_terminated else None

    @torch.inference_mode()
    def shutdown(self) -> None:
        self.abort_requests(list(self.scheduler.requests))
        self._pending = None
        self.structured_outputs.shutdown()
        self.runner.kv_caches = []
        if self.executor is not None:
            self.executor.shutdown()
        gc.unfreeze()  # what the engine held may now be collected, cycles included
