"""Triton W4A16 matmul: ``x @ W.T (+ bias)`` for W held as 4-bit codes in lanner's chunked
layout (kernels/quant_reference.py) with per-group scales (and zero points), x in the
model dtype; the weight is dequantized inside the matmul and never written out.

One kernel serves decode (BLOCK_M 16, split-K, the skinny_matmul epilogue) and prefill
(BLOCK_M 64-128 tiles). Each program owns BLOCK_N output columns and walks K one chunk
of 128 codes at a time: it loads the chunk's [BLOCK_N, 16] int32 words (64 bytes a row)
once, and for each nibble s takes ``(words >> 4 s) & 0xF``, the codes of 16 consecutive k
(the layout puts them there), as a tl.dot operand without any reshape. A code becomes a
16-bit float by bit pattern alone: ``q | 0x4300`` read as bf16 is 128 + q, ``q | 0x6400``
read as fp16 is 1024 + q (exact: their mantissas hold 7 and 10 bits at those exponents),
two integer ops a code and no int-to-float conversion (a quarter-rate instruction). The
dot then sums x * (OFFSET + q) in fp32 on the tensor cores, and once a group (or 128
codes of a larger one) is done the program adds (sum - xsum * (OFFSET + zero)) * scale,
with xsum the group's sum of x: (q - zero) * scale without per-code arithmetic. (The
offset costs about log2(OFFSET / 8) of fp32's 24 bits in the subtraction, far below bf16
rounding.) fp32 activations (tests, references) take the codes as fp32 and Triton's exact
"ieee" dot.

``dequantize_int4`` writes W out in the model dtype for ``w4a16_linear``'s
dequantize-then-cuBLAS path, which large batches may take when it measures faster
(benchmarks/kernels_linear.py --quant sweeps both; DEQUANT_MIN_M sets the switch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.quant_reference import INT4_CHUNK, INT4_CHUNK_WORDS, INT4_SYMMETRIC_ZERO
from lanner.kernels.skinny_matmul import NUM_SMS, _tile_counters, split_k_epilogue

SKINNY_MAX_M = 16
MAX_TILES = 1 << 16
# Rows from which w4a16_linear dequantizes W and calls cuBLAS instead (None: never).
# Unmeasured until a GPU sweep sets it (benchmarks/kernels_linear.py --quant --sweep).
DEQUANT_MIN_M: int | None = None
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
_CHUNK = tl.constexpr(INT4_CHUNK)
_CHUNK_WORDS = tl.constexpr(INT4_CHUNK_WORDS)
_SYMMETRIC_ZERO = tl.constexpr(INT4_SYMMETRIC_ZERO)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class W4A16Config:
    """Launch parameters of one w4a16_matmul call."""

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _codes_as_operand(words, SHIFT: tl.constexpr, dtype: tl.constexpr):
    """The codes in nibble SHIFT / 4 of int32 words, as OFFSET + q in dtype (bf16: 128,
    fp16: 1024) or as q (fp32)."""
    codes = (words >> SHIFT) & 0xF
    if dtype == tl.bfloat16:
        operand = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        operand = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        operand = codes.to(tl.float32)
    return operand


@triton.jit(do_not_specialize=["M", "partial_stride_split"])
def _w4a16_matmul_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    num_groups,
    k_per_split,
    x_stride_row,
    w_stride_row,
    partial_stride_split,
    out_stride_row,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row_mask = rows_m < M
    n_mask = rows_n < N
    x_rows = x_ptr + rows_m.to(tl.int64) * x_stride_row
    # Rows past N read the last row's words (never stored), so the loads need no mask.
    w_rows = w_ptr + tl.minimum(rows_n, N - 1).to(tl.int64) * w_stride_row
    word_offsets = tl.arange(0, _CHUNK_WORDS)
    sub_offsets = tl.arange(0, 16)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    OFFSET: tl.constexpr = (
        128.0 if dtype == tl.bfloat16 else (1024.0 if dtype == tl.float16 else 0.0)
    )
    # Sub-tiles of 16 codes per scale application: the group, or one chunk of a larger one.
    SUBS_PER_STEP: tl.constexpr = GROUP // 16 if GROUP < _CHUNK else 8

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in tl.range(k_start, k_stop, _CHUNK, num_stages=NUM_STAGES):
        words = tl.load(w_rows[:, None] + (chunk // 8 + word_offsets)[None, :])
        group_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        group_xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s in tl.static_range(8):
            ks = chunk + s * 16 + sub_offsets
            x = tl.load(
                x_rows[:, None] + ks[None, :],
                mask=x_row_mask[:, None] & (ks < K)[None, :],
                other=0.0,
            )
            w = _codes_as_operand(words, 4 * s, dtype)
            if dtype == tl.float32:
                group_sum = tl.dot(x, tl.trans(w), group_sum, input_precision="ieee")
            elif _INTERPRETED:
                # The interpreter multiplies 16-bit float operands as raw bits: widen
                # (exact; the GPU's MMA multiplies them exactly into fp32 too).
                group_sum = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), group_sum)
            else:
                group_sum = tl.dot(x, tl.trans(w), group_sum)
            group_xsum += tl.sum(x.to(tl.float32), axis=1)
            if (s + 1) % SUBS_PER_STEP == 0:
                group = tl.minimum((chunk + s * 16) // GROUP, num_groups - 1)
                scale = tl.load(scales_ptr + group * N + rows_n, mask=n_mask, other=0.0)
                if HAS_ZEROS:
                    zero = tl.load(zeros_ptr + group * N + rows_n, mask=n_mask, other=0)
                    zero = zero.to(tl.float32) + OFFSET
                else:
                    zero = tl.full((BLOCK_N,), _SYMMETRIC_ZERO + OFFSET, tl.float32)
                acc += (group_sum - group_xsum[:, None] * zero[None, :]) * scale.to(tl.float32)[
                    None, :
                ]
                group_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                group_xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    split_k_epilogue(
        acc,
        bias_ptr,
        out_ptr,
        partial_ptr,
        counter_ptr,
        rows_m,
        rows_n,
        x_row_mask,
        N,
        partial_stride_split,
        out_stride_row,
        HAS_BIAS,
        PARTIAL,
        FUSED_REDUCE,
        BLOCK_M,
        BLOCK_N,
    )


@triton.jit
def _dequantize_int4_kernel(
    w_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    N,
    K,
    num_groups,
    w_stride_row,
    out_stride_row,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1) * _CHUNK
    n_mask = rows_n < N
    words = tl.load(
        w_ptr
        + rows_n.to(tl.int64)[:, None] * w_stride_row
        + (chunk // 8 + tl.arange(0, _CHUNK_WORDS))[None, :],
        mask=n_mask[:, None],
        other=0,
    )
    sub_offsets = tl.arange(0, 16)
    for s in tl.static_range(8):
        ks = chunk + s * 16 + sub_offsets
        group = tl.minimum(ks // GROUP, num_groups - 1)
        offsets = group[None, :] * N + rows_n[:, None]
        scale = tl.load(scales_ptr + offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offsets, mask=n_mask[:, None], other=0).to(tl.float32)
        else:
            zero = _SYMMETRIC_ZERO
        codes = ((words >> (4 * s)) & 0xF).to(tl.float32)
        value = (codes - zero) * scale
        mask = n_mask[:, None] & (ks < K)[None, :]
        out = out_ptr + rows_n.to(tl.int64)[:, None] * out_stride_row + ks[None, :]
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def choose_config(m: int, n: int, k: int) -> W4A16Config:
    """Launch parameters for m rows over an [n, k] int4 weight (a first guess, not yet
    swept on a GPU: benchmarks/kernels_linear.py --quant --sweep measures the grid).
    Decode: 32 columns a program, split-K until about 2 programs per SM; prefill: 64- or
    128-row tiles of 128 columns."""
    if m <= SKINNY_MAX_M:
        block_n = 32
        split_k = 1
        chunks = triton.cdiv(k, INT4_CHUNK)
        while triton.cdiv(n, block_n) * split_k < 2 * NUM_SMS and 4 * split_k <= chunks:
            split_k *= 2
        return W4A16Config(16, block_n, split_k, num_warps=4, num_stages=4)
    block_m = 64 if m <= 64 else 128
    return W4A16Config(block_m, 128, 1, num_warps=8 if block_m == 128 else 4, num_stages=3)


def _check(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"w4a16 takes fp32, fp16 or bf16 activations, not {x.dtype}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError("packed must be the int32 [N, K / 8] chunked layout")
    if packed.shape[1] * 8 < x.shape[-1] or packed.shape[1] % INT4_CHUNK_WORDS:
        raise ValueError(f"packed {tuple(packed.shape)} does not cover K={x.shape[-1]}")
    if (
        group_size % 16
        or (group_size < INT4_CHUNK and INT4_CHUNK % group_size)
        or (group_size > INT4_CHUNK and group_size % INT4_CHUNK)
    ):
        raise ValueError(f"group_size {group_size} must divide 128 or be a multiple of it")
    if scales.shape[1] != packed.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit N={packed.shape[0]}")


def w4a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) for W in the chunked int4 layout packed [N, K_padded / 8],
    scales [groups, N] (any float dtype), zeros [groups, N] uint8 or None (zero 8).
    Parameters left None come from choose_config(M, N, K)."""
    _check(x, packed, scales, group_size)
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = choose_config(min(m, 4096), n, k)
    block_m = block_m or config.block_m
    block_n = block_n or config.block_n
    split_k = split_k or config.split_k
    chunks = triton.cdiv(k, INT4_CHUNK)
    k_per_split = triton.cdiv(chunks, split_k) * INT4_CHUNK
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    partial = split_k > 1
    if partial and grid[0] * grid[2] > MAX_TILES:
        raise ValueError("too many output tiles for split-K's counters; lower split_k")
    workspace = (
        torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    )
    counters = _tile_counters(x.device) if partial else out
    _w4a16_matmul_kernel[grid](
        x,
        packed,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        scales.shape[0],
        k_per_split,
        x.stride(0),
        packed.stride(0),
        m * n,
        n,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=partial,
        FUSED_REDUCE=partial,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_STAGES=num_stages or config.num_stages,
        num_warps=num_warps or config.num_warps,
        num_stages=num_stages or config.num_stages,
        **launch_options(out),
    )
    return out


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, k] in ``dtype`` from the chunked int4 layout (each value rounded once)."""
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    block_n = 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, INT4_CHUNK))
    _dequantize_int4_kernel[grid](
        packed,
        scales,
        zeros if zeros is not None else scales,
        out,
        n,
        k,
        scales.shape[0],
        packed.stride(0),
        out.stride(0),
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        BLOCK_N=block_n,
        num_warps=4,
        **launch_options(out),
    )
    return out


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None,
) -> torch.Tensor:
    """ops.w4a16_linear on CUDA: act-order inputs gathered, then the fused kernel, or for
    batches of DEQUANT_MIN_M rows and more W dequantized and multiplied by cuBLAS."""
    shape = x.shape
    k = shape[-1]
    m = math.prod(shape[:-1])
    rows = x.reshape(m, k)
    if perm is not None:
        rows = rows.index_select(1, perm)
    if DEQUANT_MIN_M is not None and m >= DEQUANT_MIN_M:
        weight = dequantize_int4(packed, scales, zeros, group_size, k, x.dtype)
        out = torch.nn.functional.linear(rows, weight, bias)
    else:
        out = w4a16_matmul(rows, packed, scales, zeros, group_size, bias)
    return out.view(*shape[:-1], packed.shape[0])
