"""The grammar-bitmask kernel against its reference and its definition, in the interpreter."""

from __future__ import annotations

import pytest
import torch

from lanner.kernels import reference, token_bitmask
from lanner.kernels.token_bitmask import apply_token_bitmask
from tests.kernels import skip_unless_interpreted

skip_unless_interpreted(token_bitmask._apply_bitmask_kernel)


@pytest.mark.parametrize("vocab", [37, 64, 2048 + 5, 8192])
def test_bitmask_kernel_matches_reference(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, words), generator=generator, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    rows = torch.tensor([4, 0, 2])
    bitmask_rows = torch.tensor([3, 0, 4])  # any rows of the buffer, in any order
    expected = logits.clone()
    reference.apply_token_bitmask(expected, bitmask, rows, bitmask_rows)
    got = logits.clone()
    apply_token_bitmask(got, bitmask, rows, bitmask_rows)
    assert torch.equal(got, expected)
    # The definition, bit by bit, and the rows left alone.
    for source, row in zip(bitmask_rows.tolist(), rows.tolist(), strict=True):
        for token in range(vocab):
            allowed = (int(bitmask[source, token // 32]) >> (token % 32)) & 1
            assert (got[row, token] == float("-inf")) == (not allowed)
    for row in (1, 3, 5):
        assert torch.equal(got[row], logits[row])
