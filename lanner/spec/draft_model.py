"""The draft-model proposer: a small model of the target's vocabulary, run by its own
ModelRunner (eager steps and decode CUDA graphs as the target's), with its own paged KV
cache indexed by the target's block tables.

Its cache has as many blocks as the target's, and position p of a request lives at the
same block and offset in both, so the target's block allocation, prefix cache and
preemption serve it unchanged. Each step the draft, in its first forward, computes every
scheduled chunk the target computes (prefill chunks alongside the target, and for a
decoding request the tokens the last verification accepted that it has not seen), and
samples the first draft of each drafting request there; k - 1 one-token steps give the
rest. Drafts never leave the device.

Keeping the draft's KV in step:
- a request's draft KV is valid below ``fed_end`` (kept in its state): after a rejection
  the target's num_computed_tokens is below it and the draft resumes there; after a full
  acceptance the last draft's own KV is missing, and it is computed with the next step's
  first forward;
- steps in which no request drafts (disabled by batch size, or every request's adaptive
  length at 0) do not run the draft: the blocks the target writes then are marked stale,
  as is the block of each step's last draft position until the draft has filled it. A
  request that starts on blocks it did not compute (prefix-cache hits, an n > 1 sibling's
  prompt) trusts them only up to the first stale one and computes the rest itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lanner.kernels.transfer import to_device
from lanner.memory.kv_cache import kv_cache_bytes_per_block
from lanner.model.loader import LoadedModel, load_model
from lanner.runner.model_runner import DeviceDrafts, ModelRunner, PendingStep, SequenceChunk
from lanner.runner.sampler import (
    Sampler,
    SamplingRow,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p_min_p,
    column,
    sample,
)
from lanner.spec.config import SpeculativeConfig
from lanner.spec.draft_chain import DraftChain
from lanner.spec.proposer import DEVICE_TOKEN, Proposal, ProposalSlot, Proposer
from lanner.spec.rejection_sampler import DRAFT_SEED_SALT


@dataclass
class DraftSample:
    """A draft step's samples, on the device: token ids [rows] and, for the rows of
    requests that sample, the distribution each was drawn from [rows, vocab]."""

    token_ids: torch.Tensor
    probs: torch.Tensor | None


class DraftSampler(Sampler):
    """Samples drafts as the target's sampler would sample at that position (penalties,
    min_tokens, temperature, top-k / top-p / min-p), greedy for greedy requests, with its
    own seeded noise, and keeps the distribution q the rejection sampler needs."""

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> DraftSample:  # type: ignore[override]
        logits = apply_min_tokens(apply_penalties(logits, rows), rows)
        token_ids = sample(logits, rows, seed_salt=DRAFT_SEED_SALT)
        sampled = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not sampled:
            return DraftSample(token_ids, None)
        index = to_device(sampled, torch.long, logits.device)
        picked = [rows[i] for i in sampled]
        scaled = logits.index_select(0, index).float() / column(
            [r.params.temperature for r in picked], logits.device
        )
        if any(r.params.uses_truncation for r in picked):
            scaled = apply_top_k_top_p_min_p(scaled, picked)
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        probs[index] = torch.softmax(scaled, dim=-1)
        return DraftSample(token_ids, probs)


@dataclass
class _DraftProgress:
    epoch: int  # the request's preemption count when recorded
    fed_end: int  # the draft's KV is valid for positions below this


def load_draft_model(
    config: SpeculativeConfig, target: LoadedModel, load_format: str, seed: int, max_model_len: int
) -> LoadedModel:
    """Load the draft on the target's device and check it can propose for the target."""
    assert config.model is not None
    dtype = target.dtype if config.dtype == "auto" else config.dtype
    draft = load_model(config.model, dtype, target.device, load_format, config.revision, seed)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"speculative_config.model {config.model!r} has a vocabulary of "
            f"{draft.config.vocab_size} tokens, the target {target.config.vocab_size}: a draft "
            f"must share the target's tokenizer and vocabulary size"
        )
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(
            f"speculative_config.model {config.model!r} handles "
            f"{draft.config.max_position_embeddings} positions, fewer than max_model_len "
            f"{max_model_len}; lower max_model_len or use a draft with a longer context"
        )
    return draft


class DraftModelProposer(Proposer):
    def __init__(
        self,
        draft: LoadedModel,
        block_size: int,
        cache_dtype: torch.dtype,
        enforce_eager: bool,
        num_speculative_tokens: int,
    ) -> None:
        self.draft = draft
        self.block_size = block_size
        self.cache_dtype = cache_dtype
        self.enforce_eager = enforce_eager
        self.max_tokens = num_speculative_tokens
        self.runner = ModelRunner(
            draft, block_size, cache_dtype, enforce_eager=enforce_eager, sampler=DraftSampler()
        )
        self.chain: DraftChain | None = None
        # Blocks whose draft KV is not (or not yet known to be) complete.
        self.stale_blocks: set[int] = set()

    def kv_cache_bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.draft.config, self.block_size, self.cache_dtype)

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        # A decode's catch-up (the tokens its last verification accepted, up to k + 1)
        # runs as one-token rows of the decode graphs.
        graph_rows = min(max_num_seqs * (self.max_tokens + 2), max(max_num_seqs, 512))
        self.runner.initialize_cache(num_blocks, max_num_seqs, max_model_len, graph_rows)
        if self.max_tokens > 1:
            self.chain = DraftChain(
                self.draft.model,
                self.runner.kv_caches,
                self.block_size,
                max_num_seqs,
                max_model_len,
                self.draft.config.num_key_value_heads,
                self.max_tokens - 1,
                use_graphs=not self.enforce_eager,
            )
            self.chain.capture()

    @torch.inference_mode()
    def propose(self, slots: list[ProposalSlot]) -> Proposal:
        drafting = [i for i, slot in enumerate(slots) if slot.num_draft_slots]
        proposal = Proposal.empty(len(slots))
        if not drafting:
            self.idle([slot.chunk for slot in slots])
            return proposal
        lengths = [slots[i].num_draft_slots for i in drafting]
        max_k = max(lengths)
        device = self.draft.device
        # Penalties and multi-token bad words read the drafts before each position, so
        # those requests need them on the host (one sync per draft step).
        host_tokens = any(
            slots[i].chunk.sampling.params.uses_output_history  # type: ignore[union-attr]
            for i in drafting
        )
        drafted: list[list[int]] = [[] for _ in drafting]

        # 1. Every chunk the target computes this step, from where each draft stopped;
        # drafting requests sample their first draft from their last token.
        first_chunks = [self._catch_up(slot) for slot in slots]
        pending = self.runner.launch(first_chunks, None)
        sampled = any(not slots[i].chunk.sampling.params.is_greedy for i in drafting)  # type: ignore[union-attr]
        probs = None
        if sampled:
            vocab = pending.sample.probs.shape[1]
            probs = torch.zeros((len(drafting), max_k, vocab), dtype=torch.float32, device=device)
            probs[:, 0] = pending.sample.probs
        if host_tokens:
            for row, token in enumerate(pending.sample.token_ids.tolist()):
                drafted[row].append(token)

        # 2. One-token steps, draft j + 1 from draft j: greedy drafts in one chain (one
        # graph replay), the others step by step.
        chain = self.chain
        if max_k == 1:
            token_ids = pending.sample.token_ids.unsqueeze(1)
        elif (
            chain is not None
            and not sampled
            and not host_tokens
            and chain.can_run(len(drafting), max_k - 1)
        ):
            token_ids = chain.run(
                pending.sample.token_ids,
                [slots[i].num_known_tokens - 1 for i in drafting],
                lengths,
                [slots[i].chunk.block_table for i in drafting],
            )
        else:
            token_ids = torch.full((len(drafting), max_k), -1, dtype=torch.long, device=device)
            token_ids[:, 0] = pending.sample.token_ids
            self._step_by_step(
                slots,
                drafting,
                lengths,
                pending,
                token_ids,
                probs,
                drafted if host_tokens else None,
            )

        for row, i in enumerate(drafting):
            slot = slots[i]
            # Drafts 1..k-1 were fed; the last one's KV comes with the next step.
            last_position = slot.num_known_tokens + lengths[row] - 1
            slot.state.proposer.fed_end = last_position
            self.stale_blocks.add(slot.chunk.block_table[last_position // self.block_size])
            proposal.token_ids[i] = drafted[row] if host_tokens else [DEVICE_TOKEN] * lengths[row]
        proposal.device = DeviceDrafts(token_ids, probs)
        proposal.device_rows = [None] * len(slots)
        for row, i in enumerate(drafting):
            proposal.device_rows[i] = row
        return proposal

    def _step_by_step(
        self,
        slots: list[ProposalSlot],
        drafting: list[int],
        lengths: list[int],
        pending: PendingStep,
        token_ids: torch.Tensor,
        probs: torch.Tensor | None,
        drafted: list[list[int]] | None,
    ) -> None:
        """Drafts 2..k as one runner step each (sampled drafting, penalties): fills
        ``token_ids`` and ``probs`` on the device, and ``drafted`` (the drafts so far, on
        the host) when the requests read their output history."""
        device = self.draft.device
        active = list(range(len(drafting)))  # rows of the requests still drafting
        for step in range(1, max(lengths)):
            previous_rows = {row: position for position, row in enumerate(active)}
            active = [row for row in active if lengths[row] > step]
            chunks = []
            for row in active:
                slot = slots[drafting[row]]
                base = slot.chunk.sampling
                assert base is not None
                known = drafted[row] if drafted is not None else [DEVICE_TOKEN] * step
                chunks.append(
                    SequenceChunk(
                        slot.seq_id,
                        [DEVICE_TOKEN],
                        slot.num_known_tokens - 1 + step,
                        slot.chunk.block_table,
                        SamplingRow(
                            base.params,
                            base.prompt_token_ids,
                            base.output_token_ids,
                            base.eos_token_ids,
                            known[:step],
                        ),
                        token_from_previous=previous_rows[row],
                    )
                )
            pending = self.runner.launch(chunks, pending)
            index = to_device(active, torch.long, device)
            token_ids[index, step] = pending.sample.token_ids
            # None when every row still drafting is greedy: their q stays a zero row,
            # which verification never reads (greedy drafts are point masses).
            if probs is not None and pending.sample.probs is not None:
                probs[index, step] = pending.sample.probs
            if drafted is not None:
                for row, token in zip(active, pending.sample.token_ids.tolist(), strict=True):
                    drafted[row].append(token)

    def _catch_up(self, slot: ProposalSlot) -> SequenceChunk:
        """The draft's chunk for this step: from where its KV is valid to the end of the
        target's chunk (sampling the first draft when the request drafts)."""
        chunk = slot.chunk
        computed = chunk.start_position
        end = computed + len(chunk.token_ids)
        progress = slot.state.proposer
        if not isinstance(progress, _DraftProgress) or progress.epoch != slot.epoch:
            progress = _DraftProgress(slot.epoch, self._trusted_prefix(chunk.block_table, computed))
            slot.state.proposer = progress
        start = min(progress.fed_end, computed)
        size = self.block_size
        for index in range(start // size, end // size):
            self.stale_blocks.discard(chunk.block_table[index])
        progress.fed_end = end
        return SequenceChunk(
            slot.seq_id,
            slot.token_ids(start, end),
            start,
            chunk.block_table,
            chunk.sampling if slot.num_draft_slots else None,
            # A decode's few tokens run in the decode graphs.
            one_token_rows=end - start <= self.max_tokens + 2,
        )

    def _trusted_prefix(self, block_table: list[int], computed: int) -> int:
        """Tokens of a request's computed prefix (which it may not have computed itself)
        whose draft KV is complete: up to the first stale block."""
        size = self.block_size
        for index in range(-(-computed // size)):
            if block_table[index] in self.stale_blocks:
                return index * size
        return computed

    def idle(self, chunks: list[SequenceChunk]) -> None:
        """The target computes these chunks without the draft: their blocks' draft KV is
        incomplete until each request's draft catches up."""
        size = self.block_size
        for chunk in chunks:
            first = chunk.start_position // size
            last = (chunk.start_position + len(chunk.token_ids) - 1) // size
            self.stale_blocks.update(chunk.block_table[first : last + 1])
