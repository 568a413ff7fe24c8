"""The acceptance kernel of speculative verification against its torch reference and a
per-request definition, run by Triton's CPU interpreter: point-mass drafts, decided
(sampled) drafts with residual tokens, requests without drafts, drafts read from rows of
a shared tensor in any order."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels.accept_drafts import (  # noqa: E402
    accept_drafts_kernel,
    accept_drafts_reference,
)


def definition(
    targets: list[int],
    first: int,
    drafts: list[int],
    decisions: list[int] | None,
    residual: list[int] | None,
) -> list[int]:
    """One request's new tokens: drafts while accepted, then the target's token (or the
    residual draw where a decided draft is the first rejection)."""
    kept = []
    for j, draft in enumerate(drafts):
        decided = decisions[j] if decisions is not None else -1
        accepted = targets[first + j] == draft if decided < 0 else decided == 1
        if not accepted:
            assert residual is not None or decided < 0
            kept.append(residual[j] if decided >= 0 else targets[first + j])  # type: ignore[index]
            return kept
        kept.append(draft)
    return [*kept, targets[first + len(drafts)]]


def case(seed: int, max_k: int, with_decisions: bool):
    rng = random.Random(seed)
    num_requests = rng.randint(1, 9)
    counts = [rng.randint(0, max_k) for _ in range(num_requests)]
    firsts, rows = [], 0
    for count in counts:
        firsts.append(rows)
        rows += count + 1
    vocab = 3  # small, so that drafts often match
    targets = [rng.randrange(vocab) for _ in range(rows)]
    # Drafts live in a shared [D, width] tensor (a draft model's), rows in shuffled order.
    width = max_k + rng.randint(0, 2)
    order = list(range(num_requests))
    rng.shuffle(order)
    table = torch.full((num_requests + 1, width), -7, dtype=torch.long)
    drafts = []
    for i, count in enumerate(counts):
        own = [rng.randrange(vocab) for _ in range(count)]
        drafts.append(own)
        table[order[i], :count] = torch.tensor(own, dtype=torch.long)
    meta = torch.tensor(firsts + counts + order, dtype=torch.long)
    decisions = residual = None
    if with_decisions:
        decisions = torch.tensor(
            [[rng.choice([-1, 0, 1]) for _ in range(max_k)] for _ in counts], dtype=torch.int8
        )
        residual = torch.tensor(
            [[100 + rng.randrange(vocab) for _ in range(max_k)] for _ in counts], dtype=torch.long
        )
    return torch.tensor(targets), meta, table, drafts, firsts, decisions, residual


def expected_packed(targets, firsts, drafts, decisions, residual, max_k: int) -> list[list[int]]:
    packed = []
    for i, own in enumerate(drafts):
        kept = definition(
            targets.tolist(),
            firsts[i],
            own,
            decisions[i].tolist() if decisions is not None else None,
            residual[i].tolist() if residual is not None else None,
        )
        packed.append([len(kept), *kept, *[-1] * (max_k + 1 - len(kept))])
    return packed


@pytest.mark.parametrize("max_k", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("with_decisions", [False, True])
def test_kernel_and_reference_follow_the_definition(max_k: int, with_decisions: bool) -> None:
    for seed in range(5):
        targets, meta, table, drafts, firsts, decisions, residual = case(
            seed, max_k, with_decisions
        )
        want = expected_packed(targets, firsts, drafts, decisions, residual, max_k)
        got_reference = accept_drafts_reference(targets, meta, table, max_k, decisions, residual)
        assert got_reference.tolist() == want, seed
        got_kernel = accept_drafts_kernel(targets, meta, table, max_k, decisions, residual)
        assert got_kernel.tolist() == want, seed


def test_no_drafts_anywhere_keeps_each_target_token() -> None:
    targets = torch.tensor([5, 6, 7])
    meta = torch.tensor([0, 1, 2, 0, 0, 0, 0, 0, 0])
    empty = torch.empty((0, 0), dtype=torch.long)
    assert accept_drafts_reference(targets, meta, empty, 0).tolist() == [[1, 5], [1, 6], [1, 7]]
