"""Executes one scheduled step on the device: flatten the batch, run the model, sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.transfer import to_device
from lanner.memory.kv_cache import allocate_kv_caches
from lanner.model.loader import LoadedModel
from lanner.runner.cuda_graphs import DecodeGraphs
from lanner.runner.sampler import (
    DeviceSample,
    Sampler,
    SamplingRow,
    TokenLogprobs,
    prompt_logprobs,
)
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # prompt logprobs computed this step, in prompt order, per sequence
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class PendingStep:
    """A launched step: the device may still be running it."""

    sample: DeviceSample | None
    sampled_seq_ids: list[str]  # in the order of the sample's rows
    prompt_logprobs: dict[str, list[TokenLogprobs]]

    def sample_rows(self) -> dict[str, int]:
        return {seq_id: row for row, seq_id in enumerate(self.sampled_seq_ids)}


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        block_size: int,
        cache_dtype: torch.dtype,
        enforce_eager: bool = False,
    ) -> None:
        self.model = loaded.model
        self.config = loaded.config
        self.cache_dtype = cache_dtype
        self.device = loaded.device
        self.block_size = block_size
        self.enforce_eager = enforce_eager
        self.kv_caches: list[torch.Tensor] = []  # set once the cache is sized
        self.decode_graphs: DecodeGraphs | None = None
        self.sampler = Sampler()

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate the KV cache and, on CUDA unless enforce_eager, capture decode graphs."""
        self.kv_caches = allocate_kv_caches(
            self.config, num_blocks, self.block_size, self.cache_dtype, self.device
        )
        if self.device.type == "cuda" and not self.enforce_eager:
            self.decode_graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.block_size,
                max_num_seqs,
                max_model_len,
                self.config.num_key_value_heads,
            )
            self.decode_graphs.capture()

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int | None:
        """Peak device memory (bytes) of the largest step the scheduler may send:
        ``num_tokens`` tokens over ``num_seqs`` sequences, all sampling with top-k/top-p
        (the sampler's largest temporaries). CUDA only; None elsewhere (the CPU cache is
        sized in bytes instead). It also compiles every kernel a step can use, so no
        compilation lands inside a request's latency."""
        if self.device.type != "cuda":
            return None
        num_seqs = max(1, min(num_seqs, num_tokens))
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        blocks_per_seq = max(2, -(-max(lengths) // self.block_size))
        self.kv_caches = allocate_kv_caches(
            self.config, blocks_per_seq, self.block_size, self.cache_dtype, self.device
        )
        table = list(range(blocks_per_seq))
        params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=0)
        row = SamplingRow(params, [0], [], ())
        chunks = [SequenceChunk(f"p{i}", [0] * n, 0, table, row) for i, n in enumerate(lengths)]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(chunks)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        # A chunk on top of a cached prefix and a decode, then an all-greedy step (its
        # own sampling kernel): the remaining kernel variants.
        self.execute(
            [
                SequenceChunk("extend", [0] * 3, self.block_size - 1, table, row),
                SequenceChunk("decode", [0], self.block_size, table, row),
            ]
        )
        greedy = SamplingRow(SamplingParams(temperature=0.0), [0], [], ())
        self.execute([SequenceChunk("greedy", [0], self.block_size, table, greedy)])
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return to_device(values, torch.long, self.device)

    def _previous_tokens(
        self, chunks: list[SequenceChunk], rows: list[int], previous: PendingStep | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For chunks whose token is still on the device: (their rows in the flat batch,
        given each chunk's first row in ``rows``, as a device tensor; the tokens)."""
        waiting = [i for i, c in enumerate(chunks) if c.token_from_previous is not None]
        if not waiting:
            return None
        if previous is None or previous.sample is None:
            raise RuntimeError("a chunk waits for a previous sample, but none is pending")
        sources = self._tensor([chunks[i].token_from_previous for i in waiting])
        return self._tensor([rows[i] for i in waiting]), previous.sample.token_ids[sources]

    def _graph_logits(
        self, chunks: list[SequenceChunk], previous: PendingStep | None
    ) -> torch.Tensor | None:
        """Logits from a replayed decode graph when the step is all one-token,
        all-sampling chunks that fit a captured size; else None (run eagerly)."""
        graphs = self.decode_graphs
        if graphs is None or not graphs.can_run(len(chunks)):
            return None
        if any(
            len(c.token_ids) != 1 or c.sampling is None or c.prompt_logprob_targets for c in chunks
        ):
            return None
        size = self.block_size
        positions = [c.start_position for c in chunks]
        slots = [
            c.block_table[p // size] * size + p % size
            for c, p in zip(chunks, positions, strict=True)
        ]
        return graphs.run(
            [c.token_ids[0] for c in chunks],
            positions,
            slots,
            [p + 1 for p in positions],
            [c.block_table for c in chunks],
            self._previous_tokens(chunks, list(range(len(chunks))), previous),
        )

    def execute(self, chunks: list[SequenceChunk]) -> RunnerOutput:
        """Run one flat varlen batch through the model and sample where asked."""
        return self.collect(self.launch(chunks, None))

    def collect(self, pending: PendingStep) -> RunnerOutput:
        """Wait for a launched step's samples and return them on the host."""
        out = RunnerOutput(prompt_logprobs=pending.prompt_logprobs)
        if pending.sample is None:
            return out
        sampled = pending.sample.collect()
        for seq_id, token, logprob in zip(
            pending.sampled_seq_ids, sampled.token_ids, sampled.logprobs, strict=True
        ):
            out.sampled_token_ids[seq_id] = token
            if logprob is not None:
                out.logprobs[seq_id] = logprob
        return out

    @torch.inference_mode()
    def launch(self, chunks: list[SequenceChunk], previous: PendingStep | None) -> PendingStep:
        """Queue one step on the device and return without waiting for it. Chunks may
        take their token from ``previous``'s samples, still on the device."""
        logits = self._graph_logits(chunks, previous)
        if logits is not None:
            return self._launch_sample(chunks, logits, {})
        input_ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        first_rows: list[int] = []
        for chunk in chunks:
            first_row = len(input_ids)
            first_rows.append(first_row)
            end = chunk.start_position + len(chunk.token_ids)
            input_ids += chunk.token_ids
            positions += range(chunk.start_position, end)
            seq_lens.append(end)
            start = first_row + chunk.prompt_logprob_offset
            prompt_rows += range(start, start + len(chunk.prompt_logprob_targets))
            if chunk.sampling is not None:
                sample_rows.append(len(input_ids) - 1)
        metadata = AttentionMetadata.build(
            [len(c.token_ids) for c in chunks],
            seq_lens,
            [c.block_table for c in chunks],
            self.block_size,
            self.device,
        )
        ids = self._tensor(input_ids)
        waiting = self._previous_tokens(chunks, first_rows, previous)
        if waiting is not None:
            ids[waiting[0]] = waiting[1]
        hidden = self.model(ids, self._tensor(positions), metadata, self.kv_caches)
        prompt_logprob_rows: dict[str, list[TokenLogprobs]] = {}
        if prompt_rows:
            logits = self.model.compute_logits(hidden[self._tensor(prompt_rows)])
            self._prompt_logprobs(chunks, logits, prompt_logprob_rows)
        if not sample_rows:
            return PendingStep(None, [], prompt_logprob_rows)
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        return self._launch_sample(chunks, logits, prompt_logprob_rows)

    def _launch_sample(
        self,
        chunks: list[SequenceChunk],
        logits: torch.Tensor,
        prompt_logprob_rows: dict[str, list[TokenLogprobs]],
    ) -> PendingStep:
        """Sample one token for each chunk that asks, from its row of ``logits``."""
        sampling_chunks = [c for c in chunks if c.sampling is not None]
        sample = self.sampler.launch(logits, [c.sampling for c in sampling_chunks])  # type: ignore[misc]
        return PendingStep(sample, [c.seq_id for c in sampling_chunks], prompt_logprob_rows)

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
