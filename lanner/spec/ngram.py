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

    The histories are right-aligned in one [rows, width] grid (-1 before them). Candidate
    matches are the positions holding the last token (one comparison per cell); each is
    extended backwards against the suffix max_n - 1 times, over the candidates only.
    """
    rows = len(histories)
    if rows == 0:
        return []
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=rows)
    width = int(lengths.max())
    if width < 2:
        return [[] for _ in range(rows)]
    grid = np.full((rows, width), -1, dtype=np.int64)
    row_of = np.repeat(np.arange(rows), lengths)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = np.arange(int(lengths.sum())) - offsets + np.repeat(width - lengths, lengths)
    grid[row_of, columns] = np.concatenate(histories)

    last = grid[:, -1]
    # A match ends at e <= width - 2, so that at least one token follows it.
    cand_rows, cand_ends = np.nonzero(grid[:, :-1] == last[:, None])
    match_len = np.ones(len(cand_rows), dtype=np.int64)
    alive = np.ones(len(cand_rows), dtype=bool)
    for back in range(1, max_n):
        suffix_token = grid[cand_rows, width - 1 - back]
        column = cand_ends - back
        same = (column >= 0) & (suffix_token >= 0)
        same &= grid[cand_rows, np.maximum(column, 0)] == suffix_token
        alive &= same
        match_len += alive
    good = match_len >= min_n
    # Longest match first, then the latest.
    score = np.full(rows, -1, dtype=np.int64)
    np.maximum.at(score, cand_rows[good], match_len[good] * width + cand_ends[good])
    found = score >= 0
    starts = np.where(found, score % width + 1, width)
    max_k = max(max_tokens)
    index = np.minimum(starts[:, None] + np.arange(max_k)[None, :], width - 1)
    tokens = grid[np.arange(rows)[:, None], index]
    counts = np.minimum(np.asarray(max_tokens), width - starts)
    counts = np.where(found, counts, 0)
    return [row[:count] for row, count in zip(tokens.tolist(), counts.tolist(), strict=True)]
