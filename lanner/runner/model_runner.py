"""Executes one scheduled step on the device: flatten the batch, run the model, sample.

Under tensor parallelism rank 0's runner also sends each step (its flattened layout, one
message) to the other ranks' runners, which run the same model step in lock-step
(``follow``) without sampling; rank 0 samples."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lanner.kernels import kernel_manifest, parallel_compile
from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.kernel_manifest import Variant
from lanner.kernels.transfer import to_device
from lanner.memory.kv_cache import allocate_kv_caches
from lanner.model.loader import LoadedModel
from lanner.runner.cuda_graphs import DecodeGraphs, DeviceTokenIndex, StagedInputs
from lanner.runner.sampler import (
    DeviceSample,
    Sampler,
    SamplingRow,
    TokenLogprobs,
    VerifyOutput,
    precompile_sampling,
    prompt_logprobs,
)
from lanner.runner.sampling_graphs import capture_sampling_graphs
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FLATTEN_MIN_READ_BYTES = 256 << 20


@dataclass
class SequenceChunk:
    """One sequence's share of a step: the tokens it feeds and what to compute from them."""

    seq_id: str
    token_ids: list[int]  # fed this step, at positions start_position, start_position + 1, ...
    start_position: int
    block_table: list[int]  # must cover start_position + len(token_ids) tokens
    # Set when the chunk's last token yields the next token to sample.
    sampling: SamplingRow | None = None
    # Prompt logprobs: rows [offset, offset + len(targets)) of this chunk predict `targets`.
    prompt_logprob_offset: int = 0
    prompt_logprob_targets: list[int] = field(default_factory=list)
    prompt_logprob_top: int = 0
    # Overlapped scheduling: the chunk's one token is the previous step's sample, still on
    # the device; this is its row there (token_ids then holds a placeholder).
    token_from_previous: int | None = None
    # Speculative decoding: the last num_draft_tokens of token_ids are proposed tokens to
    # verify (the chunk then samples from each of its last num_draft_tokens + 1 rows).
    # draft_row: their row in the step's DeviceDrafts when they are still on the device
    # (token_ids then holds placeholders there).
    num_draft_tokens: int = 0
    draft_row: int | None = None
    # Run as one-token rows whatever its length (a draft model catching up on the few
    # tokens its last verification accepted).
    one_token_rows: bool = False

    @property
    def num_logit_rows(self) -> int:
        return self.num_draft_tokens + 1 if self.sampling is not None else 0

    @property
    def flattened(self) -> bool:
        """A verify chunk of a decode (one or two known tokens, then drafts) runs as one
        one-token attention row per token, each over its own causal prefix: the decode
        kernel and the decode CUDA graphs take it as it is."""
        return (
            len(self.token_ids) == 1
            or self.one_token_rows
            or (self.num_draft_tokens > 0 and len(self.token_ids) <= self.num_draft_tokens + 2)
        )


@dataclass
class DeviceDrafts:
    """Proposed tokens still on the device (a draft model's), one row per drafting chunk."""

    token_ids: torch.Tensor  # [rows, max_k] int64, -1 past each row's drafts
    # [rows, max_k, vocab] float32: the distribution each draft was drawn from; None when
    # every draft is a point mass (greedy drafting).
    probs: torch.Tensor | None = None


@dataclass
class RunnerOutput:
    # per sequence: its new tokens (one, or a verified run of accepted drafts plus one)
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # prompt logprobs computed this step, in prompt order, per sequence
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class PendingStep:
    """A launched step: the device may still be running it."""

    # A DeviceSample, or (when drafts were verified) lanner.spec's DeviceVerify.
    sample: DeviceSample | Any | None
    sampled_seq_ids: list[str]  # in the order of the sample's rows
    prompt_logprobs: dict[str, list[TokenLogprobs]]
    # Launched with its sampling deferred (sample None until ``sample_deferred``): the
    # model's logits and what sampling them needs.
    deferred: DeferredSampling | None = None

    def sample_rows(self) -> dict[str, int]:
        """Each sampling sequence's row of the step's samples (known before a deferred
        sampling is launched: the chunks that sample, in order)."""
        seq_ids = self.sampled_seq_ids
        if self.deferred is not None:
            seq_ids = [c.seq_id for c in self.deferred.chunks if c.sampling is not None]
        return {seq_id: row for row, seq_id in enumerate(seq_ids)}


@dataclass
class DeferredSampling:
    """A step's model output waiting for its sampling (``ModelRunner.sample_deferred``):
    the chunks, whose sampling rows the caller finishes first, and their logits."""

    chunks: list[SequenceChunk]
    logits: torch.Tensor
    drafts: DeviceDrafts | None


class StepFollowers(Protocol):
    """Rank 0's handle on the other tensor-parallel ranks (lanner/runner/executor.py)."""

    def send_step(self, layout: StepLayout) -> None:
        """Hand every other rank this step, as one message, before rank 0 runs it."""

    def guard(self, call: Any, *args: Any) -> Any:
        """Run ``call(*args)`` (a step, or reading one) watched: a rank that fails or
        hangs meanwhile turns into an error naming it, within a bounded time."""


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        block_size: int,
        cache_dtype: torch.dtype,
        enforce_eager: bool = False,
        sampler: Sampler | None = None,
    ) -> None:
        self.model = loaded.model
        self.config = loaded.config
        self.quantization = loaded.quant_config.describe() if loaded.quant_config else None
        self.num_kv_heads = loaded.num_kv_heads  # this rank's (tensor parallelism)
        self.group = loaded.group
        # Rank 0 samples; the other ranks' runners only run the model alongside it.
        self.samples = loaded.shard.rank == 0
        # Rank 0 of a tensor-parallel model: the other ranks, once they are ready.
        self.followers: StepFollowers | None = None
        self.cache_dtype = cache_dtype
        self.device = loaded.device
        self.dtype = loaded.dtype  # the activations' and logits'
        self.block_size = block_size
        self.enforce_eager = enforce_eager
        self.kv_caches: list[torch.Tensor] = []  # set once the cache is sized
        self.decode_graphs: DecodeGraphs | None = None
        # A RejectionSampler (lanner.spec) when speculation is on: it also verifies drafts.
        self.sampler = sampler if sampler is not None else Sampler()
        # Set by startup_kernels: every kernel the graph captures launch is compiled and
        # loaded, so the captures need no warm-up forward (a variant still missing fails
        # its capture, and all are captured again with warm-ups).
        self.kernels_precompiled = False
        # Prefill chunks beside decodes run as one-token rows of a decode graph when the
        # step's rows fit one (0: never, as without graphs); see ``_flattens_prefills``.
        self.flatten_row_limit = 0
        # What those rows may re-read of their prefixes, in bytes a step (each row reads
        # its whole causal prefix): the weights' bytes, so a flattened step costs at most
        # about one more decode step's reads, and at least FLATTEN_MIN_READ_BYTES, which
        # take ~0.1 ms where the eager forward they replace costs milliseconds of
        # launches (benchmarks/mixed_step_cost.py).
        self.flatten_read_budget = max(loaded.matmul_weight_bytes, FLATTEN_MIN_READ_BYTES)
        self.kv_bytes_per_token = 0  # every layer's K and V of one token, once sized

    def initialize_cache(
        self,
        num_blocks: int,
        max_num_seqs: int,
        max_model_len: int,
        max_graph_rows: int | None = None,
    ) -> None:
        """Allocate the KV cache and, on CUDA unless enforce_eager, capture decode graphs
        for up to ``max_graph_rows`` one-token rows (default max_num_seqs; speculation
        asks for more, a verified token being one row)."""
        self.kv_caches = self._allocate_caches(num_blocks)
        self.kv_bytes_per_token = (
            sum(cache.element_size() * cache[0, 0].numel() * 2 for cache in self.kv_caches)
            // self.block_size
        )
        if self.device.type == "cuda" and not self.enforce_eager:
            self.decode_graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.block_size,
                max_graph_rows or max_num_seqs,
                max_model_len,
                self.num_kv_heads,
                greedy_tokens=self.samples,
            )
            self.decode_graphs.capture(warm_up=not self.kernels_precompiled)
            self.flatten_row_limit = self.decode_graphs.max_batch
            if self.samples:
                graphs = self.decode_graphs
                self.sampler.graphs = capture_sampling_graphs(graphs.logits, graphs.greedy_tokens)

    def _allocate_caches(self, num_blocks: int) -> list[torch.Tensor]:
        return allocate_kv_caches(
            self.config,
            num_blocks,
            self.block_size,
            self.cache_dtype,
            self.device,
            self.num_kv_heads,
        )

    @contextlib.contextmanager
    def startup_kernels(
        self, shape: StartupShape, identity: dict[str, Any] | None = None, enabled: bool = True
    ) -> Iterator[str]:
        """Have every Triton kernel variant that the startup (the memory profile, the
        decode graphs' captures, the sampler) launches compiled and loaded on a pool of
        threads before the block, CUDA only; yields how ("kernel manifest": the variants
        the last start of this engine recorded, kernels/kernel_manifest.py; "compile-only
        pass": one ``launch_startup_steps`` whose launches only compile,
        kernels/parallel_compile.py; "off"). Every variant compiled or loaded until the
        block ends is recorded, and the manifest rewritten when that differs from what it
        listed. ``identity``: what else decides the variants (speculative decoding...);
        ``enabled`` False: "off" at once."""
        if not enabled or self.device.type != "cuda" or not parallel_compile.enabled():
            yield "off"
            return
        path = known = None
        if kernel_manifest.enabled():
            identity = self.kernel_identity(shape, identity or {})
            path = kernel_manifest.manifest_path(identity)
            known = kernel_manifest.read(path, identity)
        with kernel_manifest.VariantRecorder() as recorder:
            yield self._precompile_kernels(shape, known)
        recorded = recorder.variants
        changed = recorded and not kernel_manifest.same_variants(recorded, known or [])
        if path is not None and changed and kernel_manifest.write(path, identity, recorded):
            logger.info("kernel manifest: %d variants written to %s", len(recorded), path)

    def kernel_identity(self, shape: StartupShape, extra: dict[str, Any]) -> dict[str, Any]:
        """What decides the Triton variants a startup launches (kernel_manifest's key,
        with lanner's source and the versions): the model, its dtypes and quantization,
        the cache layout, the startup's shapes, the sampler, the device, and ``extra``."""
        return {
            "model_config": self.config.raw,
            "dtype": str(self.dtype),
            "cache_dtype": str(self.cache_dtype),
            "quantization": self.quantization,
            "num_kv_heads": self.num_kv_heads,
            "block_size": self.block_size,
            "enforce_eager": self.enforce_eager,
            "shape": dataclasses.asdict(shape),
            "sampler": type(self.sampler).__qualname__,
            "device": torch.cuda.get_device_name(self.device),
            "capability": list(torch.cuda.get_device_capability(self.device)),
            **extra,
        }

    def _precompile_kernels(self, shape: StartupShape, known: list[Variant] | None) -> str:
        if known:
            functions = [variant.resolve() for variant in known]
            if all(f is not None for f in functions):
                try:
                    parallel_compile.load_variants(
                        [(f, v.specialization) for f, v in zip(functions, known, strict=True)]
                    )
                except Exception as err:  # noqa: BLE001 - stale: find them the old way
                    logger.warning("loading the kernel manifest failed (%r); compiling ahead", err)
                else:
                    self.kernels_precompiled = True
                    logger.info("kernel manifest: %d variants loaded", len(known))
                    return "kernel manifest"
        try:
            with parallel_compile.compile_launches():
                self.launch_startup_steps(shape)
        except Exception as err:  # noqa: BLE001 - the real steps compile what is missing
            logger.warning(
                "compiling the startup's kernels ahead failed (%r); they compile "
                "as they first launch",
                err,
            )
            return "off"
        self.kernels_precompiled = True
        return "compile-only pass"

    @torch.inference_mode()
    def launch_startup_steps(self, shape: StartupShape) -> None:
        """Launch, over a small scratch cache, each model step ``profile_peak_memory`` runs
        for ``shape``, one forward at each decode-graph batch size (none when
        enforce_eager) and the sampler's kernels: every kernel variant the startup runs.
        What they compute is not read (their samples are never drawn)."""
        steps = profile_steps(
            shape.num_tokens,
            shape.num_seqs,
            shape.max_model_len,
            shape.num_speculative_tokens,
            self.block_size,
        )
        caches = self._allocate_caches(steps.blocks_per_seq)
        self.kv_caches = caches
        try:
            for chunks in steps.largest + steps.others:
                self.launch(chunks, None, defer_sampling=True)
            if not self.enforce_eager:
                DecodeGraphs(
                    self.model,
                    caches,
                    self.block_size,
                    shape.max_graph_rows or shape.num_seqs,
                    max(shape.max_model_len, self.block_size),
                    self.num_kv_heads,
                ).run_each_size()
            precompile_sampling(self.config.vocab_size, self.dtype, self.device)
        finally:
            self.kv_caches = []

    @torch.inference_mode()
    def profile_peak_memory(
        self, num_tokens: int, num_seqs: int, max_model_len: int, num_speculative_tokens: int = 0
    ) -> int | None:
        """Peak device memory (bytes) of the largest step the scheduler may send:
        ``num_tokens`` tokens over ``num_seqs`` sequences of at most ``max_model_len``
        tokens each, all sampling with top-k/top-p (the sampler's largest temporaries),
        and with speculation as many of them as the budget allows verifying
        ``num_speculative_tokens`` drafts each. CUDA only; None elsewhere (the CPU cache
        is sized in bytes instead). It also compiles every kernel a step can use, so no
        compilation lands inside a request's latency."""
        if self.device.type != "cuda":
            return None
        steps = profile_steps(
            num_tokens, num_seqs, max_model_len, num_speculative_tokens, self.block_size
        )
        self.kv_caches = self._allocate_caches(steps.blocks_per_seq)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        for chunks in steps.largest:
            self.execute(chunks)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for chunks in steps.others:
            self.execute(chunks)
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return to_device(values, torch.long, self.device)

    @staticmethod
    def _device_token_index(
        chunks: list[SequenceChunk], first_rows: list[int]
    ) -> DeviceTokenIndex | None:
        """Where the input tokens still on the device are: the previous step's samples
        (overlapped scheduling) and a proposer's drafts; None when every token is on the
        host."""
        index = DeviceTokenIndex()
        for chunk, first in zip(chunks, first_rows, strict=True):
            if chunk.token_from_previous is not None:
                index.previous_rows.append(first)
                index.previous_sources.append(chunk.token_from_previous)
            if chunk.draft_row is not None:
                start = first + len(chunk.token_ids) - chunk.num_draft_tokens
                index.draft_rows += range(start, start + chunk.num_draft_tokens)
                index.draft_sources += [chunk.draft_row] * chunk.num_draft_tokens
                index.draft_columns += range(chunk.num_draft_tokens)
        return index if index.previous_rows or index.draft_rows else None

    @staticmethod
    def _token_sources(
        index: DeviceTokenIndex, previous: PendingStep | None, drafts: DeviceDrafts | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The device tensors ``index`` reads: the previous step's sampled ids, the drafts."""
        previous_ids = draft_ids = None
        if index.previous_rows:
            sample = previous.sample if previous is not None else None
            if sample is None or sample.token_ids.dim() != 1:
                raise RuntimeError("a chunk waits for a previous sample, but none is pending")
            previous_ids = sample.token_ids
        if index.draft_rows:
            if drafts is None:
                raise RuntimeError("a chunk reads device drafts, but none were given")
            draft_ids = drafts.token_ids
        return previous_ids, draft_ids

    def _device_tokens(
        self,
        index: DeviceTokenIndex,
        previous_ids: torch.Tensor | None,
        draft_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The tokens ``index`` points at, in its rows' order (the eager path's, and what
        rank 0 hands its tensor-parallel followers)."""
        values = []
        if previous_ids is not None:
            values.append(previous_ids[self._tensor(index.previous_sources)])
        if draft_ids is not None:
            values.append(
                draft_ids[self._tensor(index.draft_sources), self._tensor(index.draft_columns)]
            )
        return values[0] if len(values) == 1 else torch.cat(values)

    def _can_replay(self, chunks: list[SequenceChunk], layout: StepLayout) -> bool:
        """Whether a decode graph runs the step: every chunk runs as one-token rows, some
        sample, none asks for prompt logprobs, and the rows fit a captured size."""
        graphs = self.decode_graphs
        if graphs is None or not layout.all_flattened or not graphs.can_run(len(layout.input_ids)):
            return False
        if not layout.sample_rows:
            return False
        return not any(c.prompt_logprob_targets for c in chunks)

    def _flattens_prefills(self, chunks: list[SequenceChunk], layout: StepLayout) -> bool:
        """Whether the step's multi-token chunks run as one-token rows (each over its own
        causal prefix, as verify rows do), so that a decode graph replays a step that
        would otherwise run eagerly: a refill beside running decodes costs a replay, not
        an eager forward. Only where every row fits a captured graph, some row samples,
        none asks for prompt logprobs, and the rows' prefix reads stay in budget."""
        if not 0 < len(layout.input_ids) <= self.flatten_row_limit or not layout.sample_rows:
            return False
        reads = 0
        for chunk in chunks:
            if chunk.prompt_logprob_targets:
                return False
            if not chunk.flattened:  # rows at start + 1 .. start + n tokens of context
                n, start = len(chunk.token_ids), chunk.start_position
                reads += n * start + n * (n + 1) // 2
        return reads * self.kv_bytes_per_token <= self.flatten_read_budget

    def prepare(self, chunks: list[SequenceChunk]) -> PreparedStep:
        """``launch``'s host work that needs nothing of the step before (its layout, a
        decode graph's staged inputs): the engine does it before it waits for the step
        before's grammar bitmasks, while they fill."""
        layout = StepLayout.build(chunks)
        if not layout.all_flattened and self._flattens_prefills(chunks, layout):
            layout = StepLayout.build(chunks, flatten=True)
        layout.replay = self._can_replay(chunks, layout)
        index = self._device_token_index(chunks, layout.first_rows)
        layout.device_rows = index.rows if index is not None else []
        if not layout.replay:
            return PreparedStep(layout, None, index)
        # The graph's block carries where the device's tokens are, unless they must be
        # gathered on the host's side anyway (rank 0 hands them to its followers).
        staged = self._stage_graph(layout, index if self.followers is None else None)
        return PreparedStep(layout, staged, index)

    def _stage_graph(
        self, layout: StepLayout, device_tokens: DeviceTokenIndex | None = None
    ) -> StagedInputs:
        graphs = self.decode_graphs
        assert graphs is not None
        size = self.block_size
        slots = [
            table[p // size] * size + p % size
            for table, p in zip(layout.block_tables, layout.positions, strict=True)
        ]
        return graphs.stage(
            layout.input_ids,
            layout.positions,
            slots,
            layout.seq_lens,
            layout.block_tables,
            device_tokens,
        )

    def _graph_logits(
        self,
        layout: StepLayout,
        device_tokens,
        staged: StagedInputs | None = None,
        sources: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> torch.Tensor:
        """Logits of the sampled rows from a replayed decode graph."""
        graphs = self.decode_graphs
        assert graphs is not None
        logits = graphs.replay(staged or self._stage_graph(layout), device_tokens, sources)
        if len(layout.sample_rows) == len(layout.input_ids):
            return logits
        return logits[self._tensor(layout.sample_rows)]

    def execute(self, chunks: list[SequenceChunk]) -> RunnerOutput:
        """Run one flat varlen batch through the model and sample where asked."""
        return self.collect(self.launch(chunks, None))

    def collect(self, pending: PendingStep) -> RunnerOutput:
        """Wait for a launched step's samples and return them on the host."""
        if self.followers is not None:
            return self.followers.guard(self._collect, pending)
        return self._collect(pending)

    def _collect(self, pending: PendingStep) -> RunnerOutput:
        out = RunnerOutput(prompt_logprobs=pending.prompt_logprobs)
        if pending.sample is None:
            return out
        sampled = pending.sample.collect()
        if isinstance(sampled, VerifyOutput):
            for seq_id, tokens, logprobs in zip(
                pending.sampled_seq_ids, sampled.token_ids, sampled.logprobs, strict=True
            ):
                out.sampled_token_ids[seq_id] = tokens
                if logprobs is not None:
                    out.logprobs[seq_id] = logprobs
            return out
        for seq_id, token, logprob in zip(
            pending.sampled_seq_ids, sampled.token_ids, sampled.logprobs, strict=True
        ):
            out.sampled_token_ids[seq_id] = [token]
            if logprob is not None:
                out.logprobs[seq_id] = [logprob]
        return out

    @torch.inference_mode()
    def launch(
        self,
        chunks: list[SequenceChunk],
        previous: PendingStep | None,
        drafts: DeviceDrafts | None = None,
        defer_sampling: bool = False,
        prepared: PreparedStep | None = None,
    ) -> PendingStep:
        """Queue one step on the device and return without waiting for it. Chunks may
        take their token from ``previous``'s samples, still on the device, and their
        drafts from ``drafts``. With ``defer_sampling`` only the model runs: the caller
        finishes the chunks' sampling rows (they read outputs still being read back) and
        then calls ``sample_deferred``. ``prepared``: what ``prepare`` made of ``chunks``,
        with nothing prepared since."""
        args = (chunks, previous, drafts, defer_sampling, prepared)
        if self.followers is not None:
            return self.followers.guard(self._launch, *args)
        return self._launch(*args)

    def _launch(
        self,
        chunks: list[SequenceChunk],
        previous: PendingStep | None,
        drafts: DeviceDrafts | None,
        defer_sampling: bool = False,
        prepared: PreparedStep | None = None,
    ) -> PendingStep:
        if prepared is None:
            prepared = self.prepare(chunks)
        layout, index, staged = prepared.layout, prepared.device_tokens, prepared.staged
        device_tokens = None
        sources: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if index is not None:
            sources = self._token_sources(index, previous, drafts)
            if staged is None or not (staged.num_previous or staged.num_drafted):
                # Gathered here: the graph's block does not say where they are.
                values = self._device_tokens(index, *sources)
                device_tokens = (self._tensor(index.rows), values)
        if self.followers is not None:
            self.followers.send_step(layout)
            if device_tokens is not None:  # only rank 0 holds them: hand them over
                self.group.broadcast(device_tokens[1])
        logits, prompt_logits = self._run_model(layout, device_tokens, staged, sources)
        prompt_logprob_rows: dict[str, list[TokenLogprobs]] = {}
        if prompt_logits is not None and self.samples:
            self._prompt_logprobs(chunks, prompt_logits, prompt_logprob_rows)
        if logits is None or not self.samples:
            return PendingStep(None, [], prompt_logprob_rows)
        if defer_sampling:
            deferred = DeferredSampling(chunks, logits, drafts)
            return PendingStep(None, [], prompt_logprob_rows, deferred)
        return self._launch_sample(chunks, logits, prompt_logprob_rows, drafts)

    @torch.inference_mode()
    def sample_deferred(
        self, pending: PendingStep, wait_for_bitmasks: Callable[[], None] | None = None
    ) -> None:
        """Launch the sampling of a step launched with ``defer_sampling`` (rank 0 alone
        samples: no other rank takes part); ``wait_for_bitmasks`` as for
        ``Sampler.launch``."""
        deferred = pending.deferred
        assert deferred is not None, "this step's sampling was not deferred"
        sampled = self._launch_sample(
            deferred.chunks,
            deferred.logits,
            pending.prompt_logprobs,
            deferred.drafts,
            wait_for_bitmasks,
        )
        pending.sample, pending.sampled_seq_ids = sampled.sample, sampled.sampled_seq_ids
        pending.deferred = None

    def _run_model(
        self,
        layout: StepLayout,
        device_tokens: tuple[torch.Tensor, torch.Tensor] | None,
        staged: StagedInputs | None = None,
        sources: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The model's step: (logits of the rows that sample, logits of the prompt-logprob
        rows), None where no row asks. Every tensor-parallel rank runs it with the same
        layout, in lock-step."""
        if layout.replay:
            return self._graph_logits(layout, device_tokens, staged, sources), None
        metadata = AttentionMetadata.build(
            layout.query_lens, layout.seq_lens, layout.block_tables, self.block_size, self.device
        )
        ids = self._tensor(layout.input_ids)
        if device_tokens is not None:
            ids[device_tokens[0]] = device_tokens[1]
        hidden = self.model(ids, self._tensor(layout.positions), metadata, self.kv_caches)
        prompt_logits = None
        if layout.prompt_rows:
            prompt_logits = self.model.compute_logits(hidden[self._tensor(layout.prompt_rows)])
        logits = None
        if layout.sample_rows:
            logits = self.model.compute_logits(hidden[self._tensor(layout.sample_rows)])
        return logits, prompt_logits

    @torch.inference_mode()
    def follow(self, layout: StepLayout) -> None:
        """Run rank 0's step on this (another tensor-parallel) rank: the same model step,
        the tokens only rank 0 holds (its last samples, its drafts) received from it."""
        device_tokens = None
        if layout.device_rows:
            values = torch.empty(len(layout.device_rows), dtype=torch.long, device=self.device)
            self.group.broadcast(values)
            device_tokens = (self._tensor(layout.device_rows), values)
        self._run_model(layout, device_tokens)

    def _launch_sample(
        self,
        chunks: list[SequenceChunk],
        logits: torch.Tensor,
        prompt_logprob_rows: dict[str, list[TokenLogprobs]],
        drafts: DeviceDrafts | None,
        wait_for_bitmasks: Callable[[], None] | None = None,
    ) -> PendingStep:
        """Sample each chunk that asks from its rows of ``logits`` (one, or one per draft
        plus one when it verifies drafts)."""
        sampling_chunks = [c for c in chunks if c.sampling is not None]
        rows: list[SamplingRow] = [c.sampling for c in sampling_chunks]  # type: ignore[misc]
        seq_ids = [c.seq_id for c in sampling_chunks]
        if not any(c.num_draft_tokens for c in sampling_chunks):
            if wait_for_bitmasks is None:  # (a draft's sampler takes no bitmasks)
                sample = self.sampler.launch(logits, rows)
            else:
                sample = self.sampler.launch(logits, rows, wait_for_bitmasks)
            return PendingStep(sample, seq_ids, prompt_logprob_rows)
        verify = getattr(self.sampler, "verify", None)
        if verify is None:
            raise RuntimeError(
                "a chunk carries draft tokens, but this runner's sampler cannot verify "
                "them (build it with lanner.spec's RejectionSampler)"
            )
        proposed = [c.token_ids[len(c.token_ids) - c.num_draft_tokens :] for c in sampling_chunks]
        sample = verify(logits, rows, proposed, drafts, [c.draft_row for c in sampling_chunks])
        return PendingStep(sample, seq_ids, prompt_logprob_rows)

    @staticmethod
    def _prompt_logprobs(
        chunks: list[SequenceChunk],
        logits: torch.Tensor,
        out: dict[str, list[TokenLogprobs]],
    ) -> None:
        offset = 0
        for chunk in chunks:
            count = len(chunk.prompt_logprob_targets)
            if count:
                rows = logits[offset : offset + count]
                out[chunk.seq_id] = prompt_logprobs(
                    rows, chunk.prompt_logprob_targets, chunk.prompt_logprob_top
                )
                offset += count


@dataclass(frozen=True)
class StartupShape:
    """What sizes a startup's steps: the memory profile's (``num_tokens`` over
    ``num_seqs`` sequences of at most ``max_model_len`` tokens, verifying
    ``num_speculative_tokens`` drafts), and the decode graphs' (up to ``max_graph_rows``
    rows, default num_seqs, at ``max_model_len``)."""

    num_tokens: int
    num_seqs: int
    max_model_len: int
    num_speculative_tokens: int = 0
    max_graph_rows: int | None = None


@dataclass
class ProfileSteps:
    """The steps a memory profile runs (``ModelRunner.profile_peak_memory``): the largest
    the scheduler may send (their peak sizes the KV cache), then small ones that launch
    the remaining kernel variants; every block table covers ``blocks_per_seq`` blocks."""

    largest: list[list[SequenceChunk]]
    others: list[list[SequenceChunk]]
    blocks_per_seq: int


def profile_steps(
    num_tokens: int, num_seqs: int, max_model_len: int, num_speculative_tokens: int, block_size: int
) -> ProfileSteps:
    """``num_tokens`` prompt tokens over ``num_seqs`` sequences, all sampling with
    top-k/top-p (the sampler's largest temporaries); with speculation as many verify rows
    as the budget allows, k + 1 tokens each; then a chunk on a cached prefix beside a
    decode, and an all-greedy step (its own sampling kernel). No sequence is longer than
    ``max_model_len`` (nor can the scheduler's be): past it, positions would read beyond
    the rotary table (8192 tokens over 3 sequences at max_model_len 1024 read rows up to
    2730 of a 2048-row table, an illegal access wherever the table ended a mapping)."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    num_tokens = min(num_tokens, num_seqs * max_model_len)
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    blocks_per_seq = max(2, -(-max(lengths) // block_size))
    table = list(range(blocks_per_seq))
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=0)
    row = SamplingRow(params, [0], [], ())
    largest = [[SequenceChunk(f"p{i}", [0] * n, 0, table, row) for i, n in enumerate(lengths)]]
    k = num_speculative_tokens
    if k:
        rows = max(1, min(num_seqs, num_tokens // (k + 1)))
        largest.append(
            [
                SequenceChunk(f"v{i}", [0] * (k + 1), 0, table, row, num_draft_tokens=k)
                for i in range(rows)
            ]
        )
    greedy = SamplingRow(SamplingParams(temperature=0.0), [0], [], ())
    others = [
        [
            SequenceChunk("extend", [0] * 3, block_size - 1, table, row),
            SequenceChunk("decode", [0], block_size, table, row),
        ],
        [SequenceChunk("greedy", [0], block_size, table, greedy)],
    ]
    return ProfileSteps(largest, others, blocks_per_seq)


@dataclass
class StepLayout:
    """A step's chunks flattened into the model's inputs, with the rows of each: all that
    a tensor-parallel rank that does not sample needs to run the step."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # Attention sequences: a chunk, or one per token of a flattened chunk.
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    first_rows: list[int] = field(default_factory=list)  # each chunk's first input row
    sample_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    all_flattened: bool = True
    # Rows whose input token is still on the device (rank 0's previous samples, drafts).
    device_rows: list[int] = field(default_factory=list)
    replay: bool = False  # a decode CUDA graph runs the step

    @classmethod
    def build(cls, chunks: list[SequenceChunk], flatten: bool = False) -> StepLayout:
        """The step's rows; with ``flatten`` every chunk runs as one-token rows."""
        layout = cls()
        for chunk in chunks:
            first = len(layout.input_ids)
            layout.first_rows.append(first)
            count = len(chunk.token_ids)
            start = chunk.start_position
            end = start + count
            layout.input_ids += chunk.token_ids
            layout.positions += range(start, end)
            if flatten or chunk.flattened:
                layout.query_lens += [1] * count
                layout.seq_lens += range(start + 1, end + 1)
                layout.block_tables += [chunk.block_table] * count
            else:
                layout.query_lens.append(count)
                layout.seq_lens.append(end)
                layout.block_tables.append(chunk.block_table)
                layout.all_flattened = False
            offset = first + chunk.prompt_logprob_offset
            layout.prompt_rows += range(offset, offset + len(chunk.prompt_logprob_targets))
            layout.sample_rows += range(first + count - chunk.num_logit_rows, first + count)
        return layout


@dataclass
class PreparedStep:
    """A step's host work done ahead of its launch (``ModelRunner.prepare``)."""

    layout: StepLayout
    staged: StagedInputs | None  # a decode graph's inputs, when one replays the step
    device_tokens: DeviceTokenIndex | None = None  # where its tokens on the device are
