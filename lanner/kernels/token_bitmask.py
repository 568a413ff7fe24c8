"""Triton kernel: a grammar's token bitmask applied to rows of logits in place (every
token whose bit is 0 gets -inf), for structured outputs. Bitmasks are xgrammar's layout:
int32 words, bit j of word w standing for token 32 * w + j."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start

BLOCK = 2048  # tokens per program: 64 words


@triton.jit(do_not_specialize=["vocab_size", "logits_stride", "bitmask_stride"])
def _apply_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    bitmask_rows_ptr,
    vocab_size,
    logits_stride,
    bitmask_stride,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    index = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.load(rows_ptr + index).to(tl.int64)
    source = tl.load(bitmask_rows_ptr + index).to(tl.int64)
    tokens = block * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    words = tl.load(bitmask_ptr + source * bitmask_stride + tokens // 32, mask=in_vocab, other=0)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    tl.store(
        logits_ptr + row * logits_stride + tokens,
        float("-inf"),
        mask=in_vocab & ~allowed,
    )


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor, bitmask_rows: torch.Tensor
) -> None:
    """In place: logits[rows[i], j] = -inf wherever bit j of bitmask[bitmask_rows[i]] is 0.

    ``logits`` [B, V] on the device (contiguous rows), ``bitmask`` int32 [M, ceil(V / 32)]
    and ``rows``, ``bitmask_rows`` int64 [R] on the same device (one launch for a whole
    step's bitmask buffer, whatever order its rows are in)."""
    num_rows, vocab_size = logits.shape[0], logits.shape[1]
    if rows.numel() == 0 or num_rows == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("apply_token_bitmask needs logits with contiguous rows")
    grid = (rows.numel(), triton.cdiv(vocab_size, BLOCK))
    _apply_bitmask_kernel[grid](
        logits,
        bitmask,
        rows,
        bitmask_rows,
        vocab_size,
        logits.stride(0),
        bitmask.stride(0),
        BLOCK=BLOCK,
        num_warps=4,
        **launch_options(logits),
    )
