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
    extended backwards against the suffix max_n - 1 times, over the candidates only. No
    padded grid is built: at 256 rows of 512 tokens, filling one cost 4x the search.
    """
    rows = len(histories)
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=rows)
    if rows == 0 or int(lengths.max()) < 2:
        return [[] for _ in range(rows)]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    tokens = np.concatenate(histories)
    row_of = np.repeat(np.arange(rows), lengths)
    lasts = np.maximum(ends - 1, 0)  # each row's last position (a row of 0 has none)
    candidate = tokens == np.repeat(tokens[lasts], lengths)
    candidate[lasts[lengths > 0]] = False  # a match needs a token after it
    ends_at = np.flatnonzero(candidate)
    cand_rows = row_of[ends_at]
    first = starts[cand_rows]
    suffix_end = lasts[cand_rows]
    match_len = np.ones(len(ends_at), dtype=np.int64)
    alive = np.ones(len(ends_at), dtype=bool)
    for back in range(1, max_n):
        at, suffix_at = ends_at - back, suffix_end - back
        alive &= (at >= first) & (suffix_at >= first)
        alive &= tokens[np.maximum(at, 0)] == tokens[np.maximum(suffix_at, 0)]
        match_len += alive
    good = match_len >= min_n
    # Longest match first, then the latest.
    width = int(lengths.max())
    score = np.full(rows, -1, dtype=np.int64)
    np.maximum.at(score, cand_rows[good], match_len[good] * width + (ends_at - first)[good])
    found = score >= 0
    follow = np.where(found, starts + score % width + 1, ends)  # the first token after it
    max_k = max(max_tokens)
    index = np.minimum(follow[:, None] + np.arange(max_k)[None, :], lasts[:, None])
    picked = tokens[index]
    counts = np.where(found, np.minimum(np.asarray(max_tokens), ends - follow), 0)
    return [row[:count] for row, count in zip(picked.tolist(), counts.tolist(), strict=True)]
