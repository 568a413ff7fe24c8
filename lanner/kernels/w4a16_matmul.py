"""Triton W4A16 for batches: ``x @ W.T (+ bias)`` for W held as 4-bit codes in lanner's
plane layout (kernels/quant_reference.py) with per-group scales (and zero points), x in
the model dtype, and the dequantizer that writes W out for dequantize-then-cuBLAS.

``w4a16_linear`` (ops.w4a16_linear on CUDA) picks the path by the number of rows:
- 1 to 16 (decode): skinny_matmul_w4, which streams the 4-bit weights once and applies
  the scales in fp32, exactly.
- up to DEQUANT_MIN_M: the tiled kernel here. Each program owns BLOCK_N weight rows and
  BLOCK_M rows of x and computes out^T = W x^T: for each step it loads [BLOCK_N,
  BLOCK_K / 4] 16-bit words, dequantizes each of their four planes to the model dtype in
  registers, ``(q - zero) * scale`` rounded once (kernels/weight_codes.int4_plane_scaled;
  the same rounding as dequantize_int4, so both batched paths agree up to summation
  order), and multiplies them as the left operand by x^T on tensor cores: a Hopper
  wgmma with W from registers and x from shared memory when BLOCK_N >= 64 and 4 or 8
  warps. Split-K goes through skinny_matmul's epilogue.
- from DEQUANT_MIN_M on: ``dequantize_int4`` writes W in the model dtype (reading 0.5 and
  writing 2 bytes a weight, at copy bandwidth when it is at its best: each program
  widens one 512-k tile of BLOCK_N rows, every plane a contiguous run of 128 k, stored 16
  bytes a thread) and cuBLAS multiplies. It pays about 2.5 bytes a weight more than the
  tiled kernel reads, which large batches amortize over their compute.
DEQUANT_MIN_M comes from benchmarks/kernels_linear.py --quant int4 --sweep (the
crossover it prints).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.quant_reference import INT4_PLANE, INT4_SYMMETRIC_ZERO, INT4_TILE
from lanner.kernels.rms_norm import cast_rounded
from lanner.kernels.skinny_matmul import (
    MAX_TILES,
    NUM_SMS,
    SKINNY_MAX_M,
    _tile_counters,
    check_int4_operands,
    skinny_matmul_w4,
    split_k_epilogue,
)
from lanner.kernels.weight_codes import int4_plane_scaled, int4_zero_offset

# Rows from which w4a16_linear dequantizes W and calls cuBLAS instead of the tiled kernel
# (None: never). On the H200 (benchmarks/tiled_int4_sweep.py, 20261201-173654-tiled-int4.json)
# the tiled kernel's best tiles reach 0.55-0.65 of bf16 cuBLAS's rate from 256 rows, and
# dequantize + cuBLAS beats them there on three of the five llama3-8b projections (ties
# on the other two) and on all of them by 1.3-1.6x from 1,024 rows.
DEQUANT_MIN_M: int | None = 256
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
_PLANE = tl.constexpr(INT4_PLANE)
_TILE_GAP = tl.constexpr(INT4_TILE - INT4_PLANE)
_SYMMETRIC_ZERO = tl.constexpr(INT4_SYMMETRIC_ZERO)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class W4A16Config:
    """Launch parameters of one tiled w4a16_matmul call (block_k: codes a step, four
    planes of block_k / 4 words)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _group_operands(scales_ptr, zeros_ptr, group, rows_n, n_mask, N, HAS_ZEROS: tl.constexpr):
    """The scale and zero point (codes) of group ``group`` for rows rows_n."""
    scale = tl.load(scales_ptr + group * N + rows_n, mask=n_mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + group * N + rows_n, mask=n_mask, other=0)
    else:
        zero = tl.full(rows_n.shape, _SYMMETRIC_ZERO, tl.int32)
    return scale, zero


@triton.jit(do_not_specialize=["M", "partial_stride_split"])
def _w4a16_tiled_kernel(
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
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
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
    # Rows past M and N read copies of the last row (never stored): no row masks.
    x_rows = x_ptr + tl.minimum(rows_m, M - 1).to(tl.int64) * x_stride_row
    w_rows = w_ptr + tl.minimum(rows_n, N - 1).to(tl.int64) * w_stride_row
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    STEP: tl.constexpr = BLOCK_K // 4
    offsets = tl.arange(0, STEP)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    word_stop = tl.cdiv(k_stop, 4 * _PLANE) * _PLANE
    for word in tl.range(k_start // 4, word_stop, STEP, num_stages=NUM_STAGES):
        words = tl.load(w_rows[:, None] + (word + offsets)[None, :])
        k_base = tl.multiple_of(word + (word // _PLANE) * _TILE_GAP, STEP)
        for plane in tl.static_range(4):
            k_first = k_base + plane * _PLANE
            ks = k_first + offsets
            if EVEN_K:
                x = tl.load(x_rows[:, None] + ks[None, :])
            else:
                x = tl.load(x_rows[:, None] + ks[None, :], mask=(ks < K)[None, :], other=0.0)
            group = tl.minimum(k_first // GROUP, num_groups - 1)
            scale, zero = _group_operands(
                scales_ptr, zeros_ptr, group, rows_n, n_mask, N, HAS_ZEROS
            )
            w = int4_plane_scaled(
                words,
                tl.broadcast_to(int4_zero_offset(zero, dtype)[:, None], (BLOCK_N, STEP)),
                tl.broadcast_to(cast_rounded(scale, dtype)[:, None], (BLOCK_N, STEP)),
                plane,
                dtype,
            )
            if _INTERPRETED or dtype == tl.float32:
                acc = tl.dot(
                    w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee"
                )
            else:
                acc = tl.dot(w, tl.trans(x), acc)

    split_k_epilogue(
        tl.trans(acc),
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
    # One program per (BLOCK_N rows, one 512-k tile): each plane is 128 consecutive k.
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.program_id(1)
    n_mask = rows_n < N
    positions = tl.arange(0, _PLANE)
    words = tl.load(
        w_ptr + rows_n.to(tl.int64)[:, None] * w_stride_row + (tile * _PLANE + positions)[None, :],
        mask=n_mask[:, None],
        other=0,
    )
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out_rows = out_ptr + rows_n.to(tl.int64)[:, None] * out_stride_row
    for plane in tl.static_range(4):
        ks = tile * 4 * _PLANE + plane * _PLANE + positions
        if GROUP >= _PLANE:
            # One group for the whole plane: a scale per row, broadcast.
            group = tl.minimum((tile * 4 * _PLANE + plane * _PLANE) // GROUP, num_groups - 1)
            scale, zero = _group_operands(
                scales_ptr, zeros_ptr, group, rows_n, n_mask, N, HAS_ZEROS
            )
            scale = tl.broadcast_to(scale[:, None], (BLOCK_N, _PLANE))
            zero = tl.broadcast_to(zero[:, None], (BLOCK_N, _PLANE))
        else:
            groups = tl.minimum(ks // GROUP, num_groups - 1)
            offsets = groups[None, :] * N + rows_n[:, None]
            scale = tl.load(scales_ptr + offsets, mask=n_mask[:, None], other=0.0)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + offsets, mask=n_mask[:, None], other=0)
            else:
                zero = tl.full((BLOCK_N, _PLANE), _SYMMETRIC_ZERO, tl.int32)
        scale = cast_rounded(scale, dtype)
        value = int4_plane_scaled(words, int4_zero_offset(zero, dtype), scale, plane, dtype)
        tl.store(out_rows + ks[None, :], value, mask=n_mask[:, None] & (ks < K)[None, :])


@functools.cache
def choose_config(m: int, n: int, k: int, group_size: int = 128) -> W4A16Config:
    """Launch parameters of the tiled kernel for m rows over an [n, k] int4 weight (first
    guesses, not yet swept on a GPU: benchmarks/kernels_linear.py --quant --sweep times
    the alternatives): 128 weight rows (two wgmma row blocks) by 64 or 128 x rows, 64-k
    planes, 8 warps; split-K while fewer programs than SMs."""
    step = min(64, group_size, INT4_PLANE)
    block_m = 64 if m <= 64 else 128
    block_n = 128
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    tiles = triton.cdiv(k, INT4_TILE)
    split_k = 1
    while programs * split_k < NUM_SMS and 4 * split_k <= tiles:
        split_k *= 2
    return W4A16Config(block_m, block_n, 4 * step, split_k, num_warps=8, num_stages=3)


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
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The tiled kernel: x [M, K] @ W.T (+ bias) for W in the plane layout, packed int32
    [N, ceil(K / 512) * 64], scales [groups, N] (any float dtype), zeros [groups, N] uint8
    or None (zero 8); each weight is rounded once to x's dtype. Parameters left None come
    from choose_config(M, N, K, group_size)."""
    if x.dtype not in _DTYPES or x.dim() != 2:
        raise ValueError(f"x must be 2-D fp32, fp16 or bf16, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    check_int4_operands(k, packed, scales, zeros, group_size)
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = choose_config(min(m, 4096), n, k, group_size)
    block_m = block_m or config.block_m
    block_n = block_n or config.block_n
    block_k = block_k or config.block_k
    split_k = split_k or config.split_k
    if block_k // 4 < 16 or min(INT4_PLANE, group_size) % (block_k // 4):
        raise ValueError(f"block_k {block_k} must be 4 x a power of two dividing the group")
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), INT4_TILE) * INT4_TILE
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    partial = split_k > 1
    if partial and grid[0] * grid[2] > MAX_TILES:
        raise ValueError("too many output tiles for split-K's counters; lower split_k")
    workspace = (
        torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    )
    counters = _tile_counters(x.device) if partial else out
    num_stages = num_stages or config.num_stages
    _w4a16_tiled_kernel[grid](
        x,
        packed.view(torch.int16),
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
        packed.shape[1] * 2,
        m * n,
        n,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=partial,
        FUSED_REDUCE=partial,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=k % INT4_TILE == 0,
        NUM_STAGES=num_stages,
        num_warps=num_warps or config.num_warps,
        num_stages=num_stages,
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
    block_n: int = 32,
) -> torch.Tensor:
    """W [N, k] in ``dtype`` from the plane layout, each weight (q - zero) * scale rounded
    once after the scale's cast to ``dtype`` (kernels/quant_reference.dequantize_int4)."""
    check_int4_operands(k, packed, scales, zeros, group_size)
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, INT4_TILE))
    _dequantize_int4_kernel[grid](
        packed.view(torch.int16),
        scales,
        zeros if zeros is not None else scales,
        out,
        n,
        k,
        scales.shape[0],
        packed.shape[1] * 2,
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
    """ops.w4a16_linear on CUDA: act-order inputs gathered, then by rows the skinny kernel
    (1-16), the tiled kernel, or from DEQUANT_MIN_M rows W dequantized and multiplied by
    cuBLAS."""
    shape = x.shape
    k = shape[-1]
    m = math.prod(shape[:-1])
    rows = x.reshape(m, k)
    if perm is not None:
        rows = rows.index_select(1, perm)
    if m <= SKINNY_MAX_M:
        out = skinny_matmul_w4(rows, packed, scales, zeros, group_size, bias)
    elif DEQUANT_MIN_M is not None and m >= DEQUANT_MIN_M:
        weight = dequantize_int4(packed, scales, zeros, group_size, k, x.dtype)
        out = torch.nn.functional.linear(rows, weight, bias)
    else:
        out = w4a16_matmul(rows, packed, scales, zeros, group_size, bias)
    return out.view(*shape[:-1], packed.shape[0])
