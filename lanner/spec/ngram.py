"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of a
request's last n tokens (n from prompt_lookup_max down to prompt_lookup_min), in its prompt
or its output; the search runs over the whole batch at once in numpy."""

from __future__ import annotations

import numpy as np

from lanner.runner.model_runner import PendingStep
from lanner.spec.config import SpeculativeConfig
from lanner.spec.proposer import Proposal, ProposalSlot, Proposer

# Each request is searched over its last LOOKUP_WINDOW tokens: the search costs one
# comparison per token of the window and batch row, and code repeats itself locally.
LOOKUP_WINDOW = 2048


class _History:
    """A request's known tokens as a growing numpy array (filled incrementally)."""

    def __init__(self) -> None:
        self.tokens = np.zeros(256, dtype=np.int32)
        self.length = 0

    def update(self, slot: ProposalSlot) -> np.ndarray:
        known = slot.num_known_tokens
        if known > len(self.tokens):
            grown = np.zeros(max(known, 2 * len(self.tokens)), dtype=np.int32)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        if known > self.length:
            self.tokens[self.length : known] = slot.token_ids(self.length, known)
            self.length = known
        return self.tokens[max(0, known - LOOKUP_WINDOW) : known]


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig) -> None:
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, slots: list[ProposalSlot], previous: PendingStep | None) -> Proposal:
        proposal = Proposal.empty(len(slots))
        drafting = [i for i, slot in enumerate(slots) if slot.num_draft_slots]
        if not drafting:
            return proposal
        histories = []
        for i in drafting:
            state = slots[i].state
            if not isinstance(state.proposer, _History):
                state.proposer = _History()
            histories.append(state.proposer.update(slots[i]))
        found = ngram_lookup(
            histories, self.min_n, self.max_n, [slots[i].num_draft_slots for i in drafting]
        )
        for i, tokens in zip(drafting, found, strict=True):
            proposal.token_ids[i] = tokens
        return proposal


def ngram_lookup(
    histories: list[np.ndarray], min_n: int, max_n: int, max_tokens: list[int]
) -> list[list[int]]:
    """For each history: the up to ``max_tokens[i]`` tokens after the latest earlier
    occurrence of its longest suffix of min_n..max_n tokens that occurs earlier; [] when
    none does.

    The histories are searched as one flat array (their concatenation): candidate matches
    are the positions holding their row's last token (one comparison per token), each
    compared backwards with its row's suffix in one [candidates, max_n] gather. No padded
    grid of the histories is built: at 256 rows of 512 tokens, filling one cost 4x the
    search. Every step is a few whole-array operations (a batch-1 lookup is ~15 of them),
    since at small batches each one's fixed cost is what the search costs.
    """
    rows = len(histories)
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=rows)
    if rows == 0 or int(lengths.max()) < 2:
        return [[] for _ in range(rows)]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    tokens = histories[0] if rows == 1 else np.concatenate(histories)
    lasts = np.maximum(ends - 1, 0)  # each row's last position (a row of 0 has none)
    candidate = tokens == np.repeat(tokens[lasts], lengths)
    candidate[lasts[lengths > 0]] = False  # a match needs a token after it
    ends_at = np.flatnonzero(candidate)
    cand_rows = np.searchsorted(ends, ends_at, side="right")
    first = starts[cand_rows]
    # Position ends_at - j against the suffix's lasts - j, j < max_n; the suffix lies after
    # the candidate, so a candidate position inside its row is all that needs checking.
    back = np.arange(max_n)
    at = ends_at[:, None] - back
    same = tokens[np.maximum(at, 0)] == tokens[lasts[cand_rows][:, None] - back]
    same &= at >= first[:, None]
    match_len = np.cumprod(same, axis=1).sum(axis=1)
    # Longest match first, then the latest: candidates are in position order, so each
    # row's are contiguous and its best is one maximum over its group.
    width = int(lengths.max())
    score = np.where(match_len >= min_n, match_len * width + (ends_at - first), -1)
    best = np.full(rows, -1, dtype=np.int64)
    if len(ends_at):
        groups = np.flatnonzero(np.diff(cand_rows, prepend=-1))
        best[cand_rows[groups]] = np.maximum.reduceat(score, groups)
    found = best >= 0
    follow = np.where(found, starts + best % width + 1, ends)  # the first token after it
    max_k = max(max_tokens)
    index = np.minimum(follow[:, None] + np.arange(max_k)[None, :], lasts[:, None])
    picked = tokens[index]
    counts = np.where(found, np.minimum(np.asarray(max_tokens), ends - follow), 0)
    return [row[:count] for row, count in zip(picked.tolist(), counts.tolist(), strict=True)]
