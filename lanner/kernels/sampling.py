"""Triton kernels for sampling by the exponential race: token = argmax_i(logits_i / T - log E_i),
E_i ~ Exp(1) drawn from a per-row seed in registers, so the logits are read once and no
[B, V] tensor is written. The pure-torch reference of the same formula sits beside them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.transfer import to_device

# Columns per program: a [256, 151936] batch makes ~38k programs, a single row still ~150.
BLOCK = 1024


@triton.jit
def _exponential_from_uniform(uniform):
    """-log(u) ~ Exp(1) for u ~ U[0, 1), finite and > 0 for every u."""
    # tl.log may lower to the hardware's approximate log (absolute error ~2^-22), which
    # can round -log(u) to 0 or below when u is within a few ulps of 1: that token would
    # then win the race whatever its logit. There 1 - u is exact, and -log(1 - d) =
    # d + d^2/2 + ... + d^6/6 is within fp32 rounding of it for d < 1/16.
    d = 1.0 - uniform
    series = d * (1.0 + d * (0.5 + d * (1.0 / 3.0 + d * (0.25 + d * (0.2 + d * (1.0 / 6.0))))))
    # The floor keeps u == 0 finite.
    return tl.where(d < 0.0625, series, -tl.log(tl.maximum(uniform, 1.0e-20)))


@triton.jit
def _exponential(seed, columns):
    # Philox with counter = column: a row's draws depend on its seed only, not the batch.
    return _exponential_from_uniform(tl.rand(seed, columns))


@triton.jit
def _exponential_noise_kernel(
    out_ptr, seeds_ptr, vocab_size, stride_row, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_start(PDL)
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    noise = _exponential(tl.load(seeds_ptr + row), columns)
    tl.store(out_ptr + row.to(tl.int64) * stride_row + columns, noise, mask=columns < vocab_size)


def exponential_noise(seeds: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(seeds), vocab_size] float32: the Exp(1) draws ``exponential_race`` makes for these
    seeds, written out (for tests and for timing the unfused sampler); row i is a pure
    function of seeds[i]."""
    seed_tensor = to_device(seeds, torch.int64, device)
    out = torch.empty((len(seeds), vocab_size), dtype=torch.float32, device=device)
    _exponential_noise_kernel[(len(seeds), triton.cdiv(vocab_size, BLOCK))](
        out, seed_tensor, vocab_size, out.stride(0), BLOCK=BLOCK, num_warps=4, **launch_options(out)
    )
    return out


@triton.jit
def _race_chunk_kernel(
    logits_ptr,
    temperatures_ptr,
    seeds_ptr,
    bitmask_ptr,
    bitmask_rows_ptr,
    best_score_ptr,
    best_column_ptr,
    vocab_size,
    stride_row,
    stride_column,
    bitmask_stride,
    num_chunks,
    BLOCK: tl.constexpr,
    ALL_GREEDY: tl.constexpr,
    HAS_BITMASK: tl.constexpr,
    PDL: tl.constexpr,
):
    """The best (score, column) of one row's chunk of BLOCK columns. With ALL_GREEDY
    every row takes its argmax and the temperature and seed pointers are not read. With
    HAS_BITMASK a row whose bitmask row is >= 0 races only over the tokens that row of
    the grammar bitmasks allows (xgrammar's int32 words, bit j of word w for token
    32 * w + j): the mask is read here rather than written into a copy of the logits."""
    pdl_start(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    columns = chunk * BLOCK + tl.arange(0, BLOCK)
    in_vocab = columns < vocab_size
    logits = tl.load(
        logits_ptr + row.to(tl.int64) * stride_row + columns * stride_column,
        mask=in_vocab,
        other=float("-inf"),
    ).to(tl.float32)
    if HAS_BITMASK:
        source = tl.load(bitmask_rows_ptr + row).to(tl.int64)
        if source >= 0:
            words = tl.load(
                bitmask_ptr + source * bitmask_stride + columns // 32, mask=in_vocab, other=0
            )
            logits = tl.where(((words >> (columns % 32)) & 1) != 0, logits, float("-inf"))
    if ALL_GREEDY:
        scores = logits
    else:
        temperature = tl.load(temperatures_ptr + row)
        if temperature > 0:
            # div_rn rounds as torch's logits / T does (Triton's `/` is approximate), so
            # the kernel and the reference agree given the same noise.
            scores = tl.math.div_rn(logits, temperature) - tl.log(
                _exponential(tl.load(seeds_ptr + row), columns)
            )
        else:
            scores = logits  # a greedy row
    # Ties go to the lowest lane, i.e. the lowest column; padding (-inf) lies past them all.
    best_score, best_lane = tl.max(scores, 0, return_indices=True)
    tl.store(best_score_ptr + row * num_chunks + chunk, best_score)
    tl.store(best_column_ptr + row * num_chunks + chunk, chunk * BLOCK + best_lane)


@triton.jit
def _race_row_kernel(
    best_score_ptr, best_column_ptr, out_ptr, num_chunks, CHUNKS: tl.constexpr, PDL: tl.constexpr
):
    """A row's token: the best of its chunks' winners."""
    pdl_start(PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS)
    scores = tl.load(
        best_score_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf")
    )
    # Chunks are in column order and each holds its lowest best column, so the first best
    # chunk holds the row's lowest: ties resolve as torch.argmax does.
    winner = tl.argmax(scores, 0, tie_break_left=True)
    column = tl.load(best_column_ptr + row * num_chunks + winner)
    tl.store(out_ptr + row, column.to(tl.int64))


def exponential_race(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None,
    seeds: torch.Tensor | None,
    bitmask: torch.Tensor | None = None,
    bitmask_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token id per row (int64 [B] on the logits' device).

    Row i takes argmax_j(logits[i, j] / temperatures[i] - log E_ij), E_ij ~ Exp(1) from
    seeds[i] (the draws ``exponential_noise`` writes out), which is a draw from
    softmax(logits[i] / temperatures[i]); a row at temperature 0 takes argmax_j logits[i, j].
    ``temperatures`` is float32 [B], ``seeds`` int64 [B], both on the logits' device, or
    both None when every row is greedy (a chunked argmax: torch's single-row argmax over
    a 128k vocabulary took 37 µs on the H100). ``bitmask`` (int32 [M, ceil(V / 32)]) with
    ``bitmask_rows`` (int64 [B]: row i's bitmask row, -1 for none) restricts each row to
    the tokens its grammar allows, as ``apply_token_bitmask`` would on the logits.
    """
    if (bitmask is None) != (bitmask_rows is None):
        raise ValueError("exponential_race takes bitmask and bitmask_rows together")
    greedy = temperatures is None
    num_rows, vocab_size = logits.shape
    num_chunks = triton.cdiv(vocab_size, BLOCK)
    device = logits.device
    token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows == 0:
        return token_ids
    best_scores = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=device)
    best_columns = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=device)
    _race_chunk_kernel[(num_rows, num_chunks)](
        logits,
        logits if greedy else temperatures,  # not read when greedy
        logits if greedy else seeds,
        logits if bitmask is None else bitmask,  # not read without one
        logits if bitmask_rows is None else bitmask_rows,
        best_scores,
        best_columns,
        vocab_size,
        logits.stride(0),
        logits.stride(1),
        0 if bitmask is None else bitmask.stride(0),
        num_chunks,
        BLOCK=BLOCK,
        ALL_GREEDY=greedy,
        HAS_BITMASK=bitmask is not None,
        num_warps=4,
        **launch_options(logits),
    )
    _race_row_kernel[(num_rows,)](
        best_scores,
        best_columns,
        token_ids,
        num_chunks,
        CHUNKS=triton.next_power_of_2(num_chunks),
        num_warps=1,
        **launch_options(logits),
    )
    return token_ids


def exponential_race_reference(
    logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``exponential_race`` in torch, given the Exp(1) noise [B, V] (> 0): the oracle for the
    kernel, and the sampler's path off CUDA (with noise from torch's generators)."""
    sampled = temperatures.unsqueeze(1) > 0
    # Greedy rows divide by 1 rather than 0; their scores are the logits anyway.
    divisor = torch.where(sampled, temperatures.unsqueeze(1), 1.0)
    scores = torch.where(sampled, logits.float() / divisor - noise.log(), logits.float())
    return scores.argmax(dim=-1)
