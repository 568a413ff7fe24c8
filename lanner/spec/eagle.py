"""The EAGLE proposer: a one-layer draft head that reads the target's hidden states
(EAGLE-1/2: its final one; EAGLE-3: three of its layers) and drafts greedy chains, with
its own one-layer paged KV cache in the target's block tables.

The head's entry at position p is computed from the target's feature at p and the
token at p + 1, so it runs one step behind the target. Each step, before the target:

1. Catch-up: for every chunk of the target's previous step, the positions it verified
   (a prefill chunk, or a decode's fed token and the drafts accepted after it) are
   computed from the features that step left, overwriting the head's own guesses of
   them. A request that left the batch with that step (finished, aborted, preempted,
   or not scheduled now) gets the positions whose next token it had fed, so the blocks
   it leaves in the prefix cache carry the head's K/V too.
2. Drafts: for a request with draft slots whose last verified position was just caught
   up, the head's output there gives draft 1 (its greedy token); draft j + 1 comes from
   a head step at position c + j - 1 fed draft j and the head's own previous output.
   Those K/V entries are guesses until the next catch-up replaces them.

Positions whose features never reached the head (steps launched ahead of the previous
one's results: when speculation is off by batch size, or where the adaptive rule does not
keep the head ready; a running request left out of a step) keep whatever the cache held:
the drafts read them, so acceptance may drop, but the output never changes. Drafts are
greedy (point masses) whatever the request samples: the rejection sampler then accepts a
draft when the target's own draw equals it, so seeded requests get exactly the tokens
they get without speculation. They stay on the device unless a request's penalties or
bad words need them on the host.
"""

from __future__ import annotations

import torch

from lanner.memory.kv_cache import kv_cache_bytes_per_block
from lanner.model.loader import LoadedModel, resolve_model_path
from lanner.model.models.eagle import EagleHead, enable_aux_hidden_states, load_eagle_head
from lanner.runner.model_runner import DeviceDrafts, PendingStep, SequenceChunk
from lanner.spec.config import SpeculativeConfig
from lanner.spec.eagle_runner import CatchUp, EagleHeadRunner
from lanner.spec.proposer import DEVICE_TOKEN, Proposal, ProposalSlot, Proposer


def load_head(
    config: SpeculativeConfig,
    target: LoadedModel,
    load_format: str,
    seed: int,
    max_model_len: int,
) -> EagleHead:
    """The head of ``config.model`` on the target's device, in its dtype; for EAGLE-3 the
    target starts keeping the head's feature layers."""
    assert config.model is not None
    if config.dtype not in ("auto", str(target.dtype).removeprefix("torch.")):
        raise ValueError(
            f"speculative_config.dtype {config.dtype!r}: an EAGLE head runs in the target's "
            f"dtype ({target.dtype}), whose hidden states, embedding and LM head it shares; "
            f"leave dtype at 'auto'"
        )
    head_dir = resolve_model_path(config.model, config.revision, extra_patterns=("*.bin",))
    head = load_eagle_head(
        head_dir,
        config.method,
        target.model,
        target.dtype,
        target.device,
        max_model_len,
        load_format,
        seed,
    )
    if config.method == "eagle3":
        enable_aux_hidden_states(target.model, head.config)
    return head


class EagleProposer(Proposer):
    def __init__(
        self,
        head: EagleHead,
        target: LoadedModel,
        block_size: int,
        cache_dtype: torch.dtype,
        enforce_eager: bool,
        num_speculative_tokens: int,
    ) -> None:
        self.head = head
        self.target = target
        self.block_size = block_size
        self.cache_dtype = cache_dtype
        self.runner = EagleHeadRunner(
            head, block_size, cache_dtype, target.device, enforce_eager, num_speculative_tokens
        )
        # EAGLE-1 reads the target's final hidden states, which the runner keeps on demand.
        self.needs_hidden_states = head.layout == "eagle"
        # Positions whose features never reach the head keep stale K/V that every later
        # draft of the request reads: acceptance after a stretch of plain steps drops for
        # good (W7 on the H200: mean accepted length 1.2-1.3 at batches 16-256, where
        # requests started plain, against 3.8-4.0 at batch 1-4).
        self.needs_every_step = True
        # The chunks of the last step proposed for, as the target then ran them (the
        # engine appends the drafts to these objects).
        self._fed: list[SequenceChunk] = []

    def kv_cache_bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.head.config, self.block_size, self.cache_dtype)

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        self.runner.initialize_cache(num_blocks, max_num_seqs, max_model_len)

    @torch.inference_mode()
    def propose(self, slots: list[ProposalSlot], previous: PendingStep | None) -> Proposal:
        fed, self._fed = self._fed, [slot.chunk for slot in slots]
        proposal = Proposal.empty(len(slots))
        features = self._features(previous, fed)
        if features is None:
            return proposal
        assert previous is not None
        batch, samples = self._catch_up(slots, fed, previous.first_rows)
        if not batch.token_ids:
            return proposal
        outputs = self.runner.catch_up(batch, features)
        if not samples:
            return proposal
        drafting = [slots[i] for i, _ in samples]
        lengths = [slot.num_draft_slots for slot in drafting]
        bases = [slot.chunk.start_position for slot in drafting]
        token_ids = self.runner.draft(
            outputs,
            [row for _, row in samples],
            bases,
            [base + n - 2 for base, n in zip(bases, lengths, strict=True)],
            [slot.chunk.block_table for slot in drafting],
            max(lengths),
        )
        if min(lengths) != max(lengths):
            columns = torch.arange(max(lengths), device=token_ids.device)
            wanted = torch.tensor(lengths, device=token_ids.device).unsqueeze(1)
            token_ids = torch.where(columns < wanted, token_ids, -1)
        # Penalties and multi-token bad words read the drafts before each position.
        on_host = any(slot.chunk.sampling.params.uses_output_history for slot in drafting)  # type: ignore[union-attr]
        values = token_ids.tolist() if on_host else None
        proposal.device = DeviceDrafts(token_ids, None)
        proposal.device_rows = [None] * len(slots)
        for row, ((index, _), count) in enumerate(zip(samples, lengths, strict=True)):
            proposal.token_ids[index] = values[row][:count] if values else [DEVICE_TOKEN] * count
            proposal.device_rows[index] = row
        return proposal

    def idle(self, chunks: list[SequenceChunk], previous: PendingStep | None) -> bool:
        """Without the previous step's features there is nothing to catch up on: only
        remember what the target fed. With them, ``propose`` computes the head's K/V of
        what the last step verified."""
        if self._features(previous, self._fed) is not None:
            return False
        self._fed = chunks
        return True

    def _features(
        self, previous: PendingStep | None, fed: list[SequenceChunk]
    ) -> torch.Tensor | None:
        """The target's features of every token its previous step fed (rows as that
        step's flat batch), or None when they are not there to read."""
        if previous is None or not fed or len(previous.first_rows) != len(fed):
            return None
        total = previous.first_rows[-1] + len(fed[-1].token_ids)
        if self.head.layout == "eagle":
            source = previous.hidden_states
        else:
            source = self.target.model.model.aux_hidden_states
        if source is None or source.shape[0] < total:
            return None
        return source

    @staticmethod
    def _catch_up(
        slots: list[ProposalSlot], fed: list[SequenceChunk], first_rows: list[int]
    ) -> tuple[CatchUp, list[tuple[int, int]]]:
        """The positions to compute from the previous step's features, and for each
        request that drafts now, (its slot, the row of its last verified position)."""
        current = {slot.seq_id: (index, slot) for index, slot in enumerate(slots)}
        batch = CatchUp()
        samples: list[tuple[int, int]] = []
        for chunk, first in zip(fed, first_rows, strict=True):
            start = chunk.start_position
            entry = current.get(chunk.seq_id)
            if entry is None:
                known = len(chunk.token_ids) - chunk.num_draft_tokens
                if known > 1:
                    batch.add_run(chunk.token_ids[1:known], start, first, chunk.block_table)
                continue
            index, slot = entry
            computed = slot.chunk.start_position
            end = min(computed, start + len(chunk.token_ids))
            if end <= start:
                continue  # restarted from scratch after a preemption
            row = batch.add_run(
                slot.token_ids(start + 1, end + 1), start, first, slot.chunk.block_table
            )
            if slot.num_draft_slots and end == computed:
                samples.append((index, row))
        return batch, samples
