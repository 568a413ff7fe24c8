"""The EAGLE proposer: a one-layer draft head that reads the target's hidden states
(EAGLE-1/2: its final one; EAGLE-3: three of its layers) and drafts greedy chains, with
its own one-layer paged KV cache in the target's block tables.

The head's entry at position p is computed from the target's feature at p and the
token at p + 1, so it runs one step behind the target. The target writes every
position's features into a feature cache paged like the KV cache (by slot), in every
step, speculating or not, CUDA graphs included; the head reads them from there when a
request drafts:

1. Catch-up: the positions from where the request's head entries stop (0 at its first
   draft, or after a preemption) to its last verified one are computed from their
   features, overwriting the head's own guesses of them. So steps that ran without
   drafting (plain steps launched ahead, batches that do not speculate, prompt blocks
   that came from the prefix cache) cost the head nothing until the request drafts
   again, and then their features are all there.
2. Drafts: the head's output at the last verified position gives draft 1 (its greedy
   token); draft j + 1 comes from a head step at position c + j - 1 fed draft j and the
   head's own previous output. Those K/V entries are guesses until the next catch-up
   replaces them.

Drafts are greedy (point masses) whatever the request samples: the rejection sampler
then accepts a draft when the target's own draw equals it, so seeded requests get
exactly the tokens they get without speculation. They stay on the device unless a
request's penalties or bad words need them on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lanner.memory.kv_cache import kv_cache_bytes_per_block
from lanner.model.loader import LoadedModel, resolve_model_path
from lanner.model.models.eagle import EagleHead, enable_aux_hidden_states, load_eagle_head
from lanner.runner.model_runner import DeviceDrafts
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


@dataclass
class _HeadState:
    """How far a request's head entries are computed from the target's features."""

    computed: int  # positions [0, computed) hold the head's K/V of verified tokens
    epoch: int  # the request's preemption count then: a change means its KV was dropped


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

    def kv_cache_bytes_per_block(self) -> int:
        features = self.block_size * self.head.feature_width * self.head.fc.weight.element_size()
        return kv_cache_bytes_per_block(self.head.config, self.block_size, self.cache_dtype) + (
            features
        )

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        """Before the target's graphs are captured: they write into the feature cache."""
        self.runner.initialize_cache(num_blocks, max_num_seqs, max_model_len)
        self.target.model.model.feature_cache = self.runner.feature_cache

    @torch.inference_mode()
    def propose(self, slots: list[ProposalSlot]) -> Proposal:
        proposal = Proposal.empty(len(slots))
        drafting = [i for i, slot in enumerate(slots) if slot.num_draft_slots]
        if not drafting:
            return proposal
        batch = CatchUp()
        rows = []
        for index in drafting:
            slot = slots[index]
            state = slot.state.proposer
            if not isinstance(state, _HeadState) or state.epoch != slot.epoch:
                state = slot.state.proposer = _HeadState(0, slot.epoch)
            verified = slot.chunk.start_position  # the token fed first is t_verified
            # At least the last verified position: its output gives draft 1.
            start = min(state.computed, verified - 1)
            rows.append(
                batch.add_run(
                    slot.token_ids(start + 1, verified + 1),
                    start,
                    slot.chunk.block_table,
                    self.block_size,
                )
            )
            state.computed = verified
        outputs = self.runner.catch_up(batch)
        drafters = [slots[i] for i in drafting]
        lengths = [slot.num_draft_slots for slot in drafters]
        bases = [slot.chunk.start_position for slot in drafters]
        token_ids = self.runner.draft(
            outputs,
            rows,
            bases,
            [base + n - 2 for base, n in zip(bases, lengths, strict=True)],
            [slot.chunk.block_table for slot in drafters],
            max(lengths),
        )
        if min(lengths) != max(lengths):
            columns = torch.arange(max(lengths), device=token_ids.device)
            wanted = torch.tensor(lengths, device=token_ids.device).unsqueeze(1)
            token_ids = torch.where(columns < wanted, token_ids, -1)
        # Penalties and multi-token bad words read the drafts before each position.
        on_host = any(slot.chunk.sampling.params.uses_output_history for slot in drafters)  # type: ignore[union-attr]
        values = token_ids.tolist() if on_host else None
        proposal.device = DeviceDrafts(token_ids, None)
        proposal.device_rows = [None] * len(slots)
        for row, (index, count) in enumerate(zip(drafting, lengths, strict=True)):
            proposal.token_ids[index] = values[row][:count] if values else [DEVICE_TOKEN] * count
            proposal.device_rows[index] = row
        return proposal
