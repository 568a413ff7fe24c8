"""The memory profile's steps are steps the scheduler could send: no sequence longer
than max_model_len. Past it the profile's positions read beyond the rotary table (rows
up to 2730 of a 2048-row table for 8192 tokens over 3 sequences at max_model_len 1024),
which on the H200 was an illegal memory access wherever the table ended a mapping."""

from __future__ import annotations

import pytest

from lanner.runner.model_runner import profile_steps


@pytest.mark.parametrize(
    ("num_tokens", "num_seqs", "max_model_len", "k"),
    [(8192, 3, 1024, 0), (8192, 3, 1024, 4), (8192, 256, 8192, 0), (100, 1, 32, 2), (5, 8, 64, 0)],
)
def test_no_profiled_sequence_passes_max_model_len(
    num_tokens: int, num_seqs: int, max_model_len: int, k: int
) -> None:
    steps = profile_steps(num_tokens, num_seqs, max_model_len, k, block_size=16)
    prompts = steps.largest[0]
    for chunks in steps.largest:
        for chunk in chunks:
            assert chunk.start_position + len(chunk.token_ids) <= max_model_len
            assert len(chunk.block_table) * 16 >= chunk.start_position + len(chunk.token_ids)
    # Still the largest step the scheduler may send: the budget, or every sequence full.
    assert sum(len(c.token_ids) for c in prompts) == min(
        num_tokens, min(num_seqs, num_tokens) * max_model_len
    )
    if k:
        assert all(c.num_draft_tokens == k for c in steps.largest[1])
