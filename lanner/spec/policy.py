"""How many tokens each request proposes per step, and the counters of what was accepted.

The adaptive rule: a request whose drafts are accepted position by position with
probability a (its recent rate) gains E(j) = 1 + a + ... + a^j tokens from a step with j
drafts, and that step costs 1 + j * c target steps, c being one draft token's cost. The
request proposes the j in [0, k] that maximizes E(j) / (1 + j * c), the same bound the
W7 benchmark reports. A request that falls to j = 0 probes with one draft every
``PROBE_INTERVAL`` steps, so a rate that recovers is seen again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lanner.spec.config import SpeculativeConfig

# The acceptance rate is tracked per request as decayed counts with a prior of
# PRIOR_POSITIONS positions at PRIOR_RATE, so a new request starts at (nearly) full k.
PRIOR_RATE = 0.8
PRIOR_POSITIONS = 2.0
DECAY = 0.8  # per verified step: about the last five steps count
PROBE_INTERVAL = 8
RATE_BINS = 100  # the best draft length is tabulated at rates 0, 0.01, ..., 1


@dataclass
class RequestSpecState:
    """Per-request speculation state, kept on the engine's Request."""

    accepted: float = 0.0  # decayed accepted drafts
    positions: float = 0.0  # decayed positions tested (accepted + the first rejection)
    steps_without_drafts: int = 0
    # The proposer's own state (e.g. how far a draft model's KV cache is computed).
    proposer: Any = None

    @property
    def acceptance_rate(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_POSITIONS) / (self.positions + PRIOR_POSITIONS)


@dataclass
class SpecDecodeStats:
    """Cumulative counters, as vLLM's spec_decode metrics count them."""

    num_drafts: int = 0  # verify steps of a request with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step of a speculating request: accepted drafts + 1."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def best_draft_length(rate: float, cost: float, max_tokens: int) -> int:
    """argmax over j in [0, max_tokens] of E(j) / (1 + j * cost), E(j) = sum_{i<=j} rate^i."""
    best, best_value, expected, term = 0, 1.0, 1.0, 1.0
    for j in range(1, max_tokens + 1):
        term *= rate
        expected += term
        value = expected / (1.0 + j * cost)
        if value > best_value + 1e-12:
            best, best_value = j, value
    return best


class DraftLengthPolicy:
    """Decides each request's draft length and records how its drafts fared."""

    def __init__(self, config: SpeculativeConfig, draft_cost: float) -> None:
        self.config = config
        self.max_tokens = config.num_speculative_tokens
        self.draft_cost = draft_cost
        self.table = [
            best_draft_length(i / RATE_BINS, draft_cost, self.max_tokens)
            for i in range(RATE_BINS + 1)
        ]
        self.stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * self.max_tokens)

    def enabled(self, num_running: int) -> bool:
        """False when the batch is large enough that no request speculates."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_running < limit

    def draft_length(self, state: RequestSpecState) -> int:
        """Drafts to schedule for a request about to decode (the caller caps them by the
        token budget and the request's remaining length)."""
        if not self.config.adaptive_draft_length:
            return self.max_tokens
        length = self.table[round(state.acceptance_rate * RATE_BINS)]
        if length:
            state.steps_without_drafts = 0
            return length
        state.steps_without_drafts += 1
        if state.steps_without_drafts >= PROBE_INTERVAL:
            state.steps_without_drafts = 0
            return 1
        return 0

    def observe(self, state: RequestSpecState, num_drafts: int, num_accepted: int) -> None:
        """Record one verify step of a request: ``num_drafts`` proposed, the first
        ``num_accepted`` of them accepted."""
        if num_drafts <= 0:
            return
        tested = num_accepted + (1 if num_accepted < num_drafts else 0)
        state.accepted = DECAY * state.accepted + num_accepted
        state.positions = DECAY * state.positions + tested
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.num_accepted_tokens_per_pos[position] += 1
