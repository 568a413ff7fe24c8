"""The batched n-gram lookup and the small-batch index against a plain per-request search."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np

from lanner.spec import ngram
from lanner.spec.ngram import ngram_lookup


def lookup_one(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition: the longest suffix (max_n down to min_n) that also occurs earlier,
    its latest earlier occurrence, and up to k tokens after it."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


def test_batched_lookup_equals_the_definition() -> None:
    rng = random.Random(0)
    for trial in range(60):
        histories = []
        for _ in range(rng.randint(1, 9)):
            alphabet = rng.randint(2, 6)
            histories.append([rng.randrange(alphabet) for _ in range(rng.randint(1, 40))])
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        ks = [rng.randint(1, 6) for _ in histories]
        got = ngram_lookup([np.array(h, dtype=np.int32) for h in histories], min_n, max_n, ks)
        want = [lookup_one(h, min_n, max_n, k) for h, k in zip(histories, ks, strict=True)]
        assert got == want, (trial, histories, min_n, max_n, ks)


def test_no_match_and_short_histories_propose_nothing() -> None:
    histories = [np.array([1, 2, 3, 4]), np.array([7]), np.array([5, 5])]
    assert ngram_lookup(histories, 2, 3, [3, 3, 3]) == [[], [], []]
    assert ngram_lookup(histories, 1, 3, [3, 3, 3]) == [[], [], [5]]


def test_a_batch_of_histories_shorter_than_max_n() -> None:
    # A 1-token prompt's first decodes: every history shorter than prompt_lookup_max
    # (the padded-grid search indexed before its start here), and an empty one.
    histories = [np.array([3, 3]), np.array([4]), np.array([], dtype=np.int32)]
    assert ngram_lookup(histories, 1, 5, [2, 2, 2]) == [[3], [], []]
    rng = random.Random(1)
    for _ in range(200):
        histories = [[rng.randrange(2) for _ in range(rng.randint(1, 4))] for _ in range(3)]
        got = ngram_lookup([np.array(h, dtype=np.int32) for h in histories], 1, 5, [3] * 3)
        assert got == [lookup_one(h, 1, 5, 3) for h in histories], histories


def test_small_batch_index_equals_the_batched_search_as_tokens_arrive(monkeypatch) -> None:
    """The per-request n-gram index (batches up to SMALL_BATCH) against ngram_lookup on the
    same window, after every arrival of 1-7 tokens (a step's accepted run), with a window
    short enough to slide."""
    monkeypatch.setattr(ngram, "LOOKUP_WINDOW", 24)
    rng = random.Random(2)
    for trial in range(40):
        alphabet = rng.randint(2, 5)
        tokens = [rng.randrange(alphabet) for _ in range(rng.randint(1, 12))]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        history = ngram._History()
        while len(tokens) < 70:
            slot = SimpleNamespace(
                num_known_tokens=len(tokens), token_ids=lambda a, b, t=tokens: t[a:b]
            )
            window = history.update(slot)
            k = rng.randint(1, 6)
            got = history.lookup(min_n, max_n, k)
            assert got == ngram_lookup([window], min_n, max_n, [k])[0], (trial, tokens)
            if len(tokens) <= 24:
                assert got == lookup_one(tokens, min_n, max_n, k)
            tokens = tokens + [rng.randrange(alphabet) for _ in range(rng.randint(1, 7))]
