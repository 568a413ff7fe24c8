"""The proposer interface: each step, after scheduling and before the target runs, propose
up to k tokens for every request the scheduler gave draft slots.

A proposer sees the whole scheduled batch (every request's chunk, so a proposer with its
own KV cache computes it alongside the target, or catches up later on what it missed).
An EAGLE-style head reads the target's hidden states from a feature cache the target
writes every step (``LlamaModel.feature_cache``). Drafts may stay on the device
(``DeviceDrafts``): the target's verify step reads them there, so proposing and verifying
need no host sync between them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

from lanner.runner.model_runner import DeviceDrafts, SequenceChunk
from lanner.spec.policy import RequestSpecState

# Stands for a draft token still on the device in host-side lists (only their number is
# read there); the engine's placeholder for unread samples has the same value.
DEVICE_TOKEN = -1


@dataclass
class ProposalSlot:
    """One scheduled request as a proposer sees it."""

    seq_id: str
    # What the target feeds this step before any draft: tokens [chunk.start_position,
    # chunk.start_position + len(chunk.token_ids)), which are computed once it runs.
    chunk: SequenceChunk
    # Propose at most this many tokens (0: the request only runs alongside). The block
    # table covers them.
    num_draft_slots: int
    token_ids: Callable[[int, int], list[int]]  # the request's known tokens [start, end)
    num_known_tokens: int  # prompt + outputs the host has read
    state: RequestSpecState
    epoch: int  # how often the request was preempted: a change means its KV was dropped


@dataclass
class Proposal:
    """Drafts for every slot, in slot order."""

    # Per slot: its proposed tokens (fewer than its slots when nothing better is known);
    # DEVICE_TOKEN where they are on the device only.
    token_ids: list[list[int]]
    device: DeviceDrafts | None = None
    device_rows: list[int | None] = field(default_factory=list)  # per slot, its row there

    @classmethod
    def empty(cls, num_slots: int) -> Proposal:
        return cls([[] for _ in range(num_slots)])


class Proposer(abc.ABC):
    """Guesses the next tokens of running requests."""

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of the proposer's own KV cache per block of the target's block tables
        (its cache uses the same block ids, so it needs no allocator of its own)."""
        return 0

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate the proposer's KV cache (num_blocks blocks, like the target's); a
        proposer without one has nothing to do."""
        return None

    @abc.abstractmethod
    def propose(self, slots: list[ProposalSlot]) -> Proposal:
        """Drafts for this step's slots."""

    def idle(self, chunks: list[SequenceChunk]) -> None:
        """A step in which no request drafts: note what the target computes in
        ``chunks``, cheaply (a step the engine runs without speculation costs the host
        nothing more than without a proposer)."""
        return None
