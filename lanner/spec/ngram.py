"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of a
request's last n tokens (n from prompt_lookup_max down to prompt_lookup_min), in its prompt
or its output. Batches of more than SMALL_BATCH requests search all at once in numpy; smaller
ones look each request's suffixes up in an index of its n-grams, kept as tokens arrive
(a batch-1 search costs numpy's fixed per-call costs, ~15 calls, every step)."""

from __future__ import annotations

import numpy as np

from lanner.spec.config import SpeculativeConfig
from lanner.spec.proposer import Proposal, ProposalSlot, Proposer

# Each request is searched over its last LOOKUP_WINDOW tokens: the search costs one
# comparison per token of the window and batch row, and code repeats itself locally.
LOOKUP_WINDOW = 2048
# Batches up to this many drafting requests use each request's n-gram index.
SMALL_BATCH = 4


class _History:
    """A request's known tokens as a growing numpy array (filled incrementally), and for
    small batches a list of them with an index of their n-grams."""

    def __init__(self) -> None:
        self.tokens = np.zeros(256, dtype=np.int32)
        self.length = 0
        self.values: list[int] = []
        # n-gram (a tuple of n tokens, min_n <= n <= max_n) -> where its latest occurrence
        # ends, over the n-grams ending before position `indexed` (each has a token after
        # it). Built on the first small-batch lookup, from the lookup window on.
        self.index: dict[tuple[int, ...], int] | None = None
        self.indexed = 0

    def update(self, slot: ProposalSlot) -> np.ndarray:
        known = slot.num_known_tokens
        if known > len(self.tokens):
            grown = np.zeros(max(known, 2 * len(self.tokens)), dtype=np.int32)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        if known > self.length:
            new = slot.token_ids(self.length, known)
            self.tokens[self.length : known] = new
            self.values += new
            self.length = known
        return self.tokens[max(0, known - LOOKUP_WINDOW) : known]

    def lookup(self, min_n: int, max_n: int, max_tokens: int) -> list[int]:
        """``ngram_lookup`` of this history alone (call ``update`` first), from the index:
        the same tokens, in a few dict operations a step once the index is built."""
        values, known = self.values, self.length
        window_start = max(0, known - LOOKUP_WINDOW)
        if self.index is None:
            self.index, self.indexed = {}, window_start
        index = self.index
        # Every n-gram now followed by a token: those ending before the last position.
        for end in range(max(self.indexed, window_start), known - 1):
            for n in range(min_n, min(max_n, end + 1) + 1):
                index[tuple(values[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, known - 1)
        for n in range(min(max_n, known - 1), min_n - 1, -1):
            end = index.get(tuple(values[known - n :]))
            # (An occurrence starting before the window is the latest only when none is
            # inside it: then there is no match of this length, as in ngram_lookup.)
            if end is not None and end - n + 1 >= window_start:
                return values[end + 1 : min(end + 1 + max_tokens, known)]
        return []


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig) -> None:
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, slots: list[ProposalSlot]) -> Proposal:
        proposal = Proposal.empty(len(slots))
        drafting = [i for i, slot in enumerate(slots) if slot.num_draft_slots]
        if not drafting:
            return proposal
        histories = []
        windows = []
        for i in drafting:
            state = slots[i].state
            if not isinstance(state.proposer, _History):
                state.proposer = _History()
            windows.append(state.proposer.update(slots[i]))
            histories.append(state.proposer)
        if len(drafting) <= SMALL_BATCH:
            found = [
                history.lookup(self.min_n, self.max_n, slots[i].num_draft_slots)
                for history, i in zip(histories, drafting, strict=True)
            ]
        else:
            found = ngram_lookup(
                windows, self.min_n, self.max_n, [slots[i].num_draft_slots for i in drafting]
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
