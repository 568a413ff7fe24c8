"""Triton W8A8 matmul for batches: ``dequant(quantize_rows(x)) @ dequant(weight).T (+
bias)`` for fp8 e4m3 or int8 weights [N, K] with one fp32 scale per output channel, the
activations quantized per token (scale absmax / x_qmax) to the weight's dtype, products on
tensor cores (fp8 or int8 MMA, fp32 or int32 accumulation), then scaled by x_scale[m] *
w_scale[n] in fp32 and rounded to x's dtype.

``w8a8_linear`` (ops.w8a8_linear on CUDA) picks the path by the number of rows:
- 1 to 16 (decode): skinny_matmul_w8, whose programs quantize the rows themselves (same
  rounding, no extra launch; the 1-16 rows are read from L2) while the 8-bit weights
  stream once at copy bandwidth (a decode step pays for bytes, not for the products).
  Its W8A16 variant (x_qmax None: rows unrounded) is what benchmarks compare against.
- more: ``quantize_rows`` writes the quantized rows and their scales once (one program per
  row), then fp8 goes to torch._scaled_mm (cuBLAS, rowwise scales) where the shapes allow
  and int8 (and fp8 otherwise) to the tiled kernel here, which reads them in [BLOCK_M,
  BLOCK_K] tiles (torch._int_mm returns int32 [M, N], whose scaling would cost passes
  over 4 bytes a value).

The rounding of x matches the reference (kernels/quant_reference.quantize_rows): fp8
round-to-nearest-even of x / scale clamped to +-448; int8 round-half-even (by adding and
subtracting 1.5 * 2^23) clamped to [-128, 127]. Both paths take each row's absmax given
(``row_absmax``) in place of reading it from x: a row-parallel rank holds a slice of each
row and scales it by the whole row's, computed by the same expression as from x.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.quant_reference import FP8_DTYPE
from lanner.kernels.skinny_matmul import (
    MAX_TILES,
    SKINNY_MAX_M,
    _tile_counters,
    check_row_absmax,
    skinny_matmul_w8,
    split_k_epilogue,
)
from lanner.kernels.weight_codes import round_to_8bit

# Triton's interpreter multiplies fp8/int8 tl.dot operands as raw integers or not at all:
# under it the products run in fp32 (exact: |x_q * w_q| <= 448^2, sums in the tests stay
# far inside fp32's 24 bits for int8).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@dataclass(frozen=True)
class W8A8Config:
    """Launch parameters of one tiled w8a8_matmul call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _quantize_tile(x, x_scale, IS_FP8: tl.constexpr):
    """x [rows, cols] (fp32) / x_scale [rows] -> fp8 e4m3 or int8 codes."""
    rounded = round_to_8bit(x / x_scale[:, None], IS_FP8)
    return rounded.to(tl.float8e4nv if IS_FP8 else tl.int8)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,
    absmax_ptr,
    K,
    x_stride_row,
    out_stride_row,
    x_qmax,
    IS_FP8: tl.constexpr,
    GIVEN_ABSMAX: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    if GIVEN_ABSMAX:
        # The whole row's absmax, of which this row is a row-parallel rank's slice.
        row_max = tl.load(absmax_ptr + row + tl.arange(0, 1))
    else:
        absmax = tl.zeros((1, BLOCK), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            mask = (start + offsets < K)[None, :]
            x = tl.load(x_ptr + row * x_stride_row + start + offsets[None, :], mask=mask, other=0.0)
            absmax = tl.maximum(absmax, tl.abs(x.to(tl.float32)))
        row_max = tl.max(absmax, axis=1)
    scale = tl.where(row_max > 0, row_max / x_qmax, 1.0)
    tl.store(scale_ptr + row + tl.arange(0, 1), scale)
    for start in range(0, K, BLOCK):
        mask = (start + offsets < K)[None, :]
        x = tl.load(x_ptr + row * x_stride_row + start + offsets[None, :], mask=mask, other=0.0)
        codes = _quantize_tile(x.to(tl.float32), scale, IS_FP8)
        tl.store(out_ptr + row * out_stride_row + start + offsets[None, :], codes, mask=mask)


@triton.jit(do_not_specialize=["M", "partial_stride_split"])
def _w8a8_matmul_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    k_per_split,
    x_stride_row,
    w_stride_row,
    partial_stride_split,
    out_stride_row,
    IS_FP8: tl.constexpr,
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
    x_rows = x_ptr + rows_m.to(tl.int64) * x_stride_row
    w_rows = w_ptr + tl.minimum(rows_n, N - 1).to(tl.int64) * w_stride_row
    k_offsets = tl.arange(0, BLOCK_K)

    x_scale = tl.load(x_scale_ptr + rows_m, mask=x_row_mask, other=1.0)

    ACC_INT: tl.constexpr = not IS_FP8 and not _INTERPRETED
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if ACC_INT else tl.float32)
    w_ptrs = w_rows[:, None] + (k_start + k_offsets)[None, :]
    x_ptrs = x_rows[:, None] + (k_start + k_offsets)[None, :]
    for k in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=x_row_mask[:, None], other=0.0)
        else:
            in_range = (k + k_offsets < k_stop)[None, :]
            w = tl.load(w_ptrs, mask=in_range, other=0.0)
            x = tl.load(x_ptrs, mask=x_row_mask[:, None] & in_range, other=0.0)
        if _INTERPRETED:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        elif IS_FP8:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    w_scale = tl.load(w_scale_ptr + rows_n, mask=rows_n < N, other=0.0)
    scaled = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    split_k_epilogue(
        scaled,
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


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, x_qmax: float, row_absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of x [M, K] on the device: (codes [M, K], scales [M] fp32),
    as kernels/quant_reference.quantize_rows (``row_absmax`` [M] fp32: each row's absmax
    given, not read from x)."""
    m, k = x.shape
    if row_absmax is not None:
        check_row_absmax(row_absmax, m)
    codes = torch.empty((m, k), dtype=dtype, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    if x.stride(-1) != 1:
        x = x.contiguous()
    block = min(triton.next_power_of_2(max(k, 16)), 2048)
    _quantize_rows_kernel[(m,)](
        x,
        codes,
        scales,
        row_absmax if row_absmax is not None else scales,
        k,
        x.stride(0),
        codes.stride(0),
        float(x_qmax),
        IS_FP8=dtype == FP8_DTYPE,
        GIVEN_ABSMAX=row_absmax is not None,
        BLOCK=block,
        num_warps=4,
        **launch_options(codes),
    )
    return codes, scales


@functools.cache
def choose_config(m: int, n: int, k: int) -> W8A8Config:
    """Launch parameters of the tiled kernel for m rows over an [n, k] 8-bit weight."""
    block_m = 64 if m <= 64 else 128
    return W8A8Config(block_m, 128, 128, 1, num_warps=8 if block_m == 128 else 4, num_stages=3)


def w8a8_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The tiled Triton W8A8 product of rows x [M, K] already quantized to weight's dtype
    (fp8 e4m3 or int8) with their per-row x_scale [M], and weight [N, K] with per-channel
    weight_scale [N] (fp32), rounded to out_dtype. Parameters left None come from
    choose_config(M, N, K)."""
    if weight.dtype not in (FP8_DTYPE, torch.int8) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D fp8 e4m3 or int8 tensor, got {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if x.dtype != weight.dtype:
        raise ValueError(f"x must be quantized to {weight.dtype}, got {x.dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    config = choose_config(min(m, 4096), n, k)
    block_m = block_m or config.block_m
    block_n = block_n or config.block_n
    block_k = block_k or config.block_k
    split_k = split_k or config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    partial = split_k > 1
    if partial and grid[0] * grid[2] > MAX_TILES:
        raise ValueError("too many output tiles for split-K's counters; lower split_k")
    workspace = (
        torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    )
    counters = _tile_counters(x.device) if partial else out
    _w8a8_matmul_kernel[grid](
        x,
        x_scale,
        weight,
        weight_scale,
        bias if bias is not None else weight_scale,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        m * n,
        n,
        IS_FP8=weight.dtype == FP8_DTYPE,
        HAS_BIAS=bias is not None,
        PARTIAL=partial,
        FUSED_REDUCE=partial,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=k % block_k == 0 and k_per_split % block_k == 0,
        NUM_STAGES=num_stages or config.num_stages,
        num_warps=num_warps or config.num_warps,
        num_stages=num_stages or config.num_stages,
        **launch_options(out),
    )
    return out


def scaled_mm_fits(m: int, n: int, k: int) -> bool:
    """torch._scaled_mm's shape rule (cuBLASLt): K and N multiples of 16."""
    return k % 16 == 0 and n % 16 == 0 and m > 0


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_qmax: float,
    row_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """ops.w8a8_linear on CUDA: 1-16 rows through the skinny kernel, which quantizes them
    itself; larger batches quantize the rows once, then fp8 goes to torch._scaled_mm
    (rowwise scales, bf16 out) and int8 to the tiled kernel. ``row_absmax`` (fp32, one a
    row): each row's absmax given (a row-parallel rank's), on every path."""
    shape = x.shape
    k = shape[-1]
    m = math.prod(shape[:-1])
    n = weight.shape[0]
    rows = x.reshape(m, k)
    if m <= SKINNY_MAX_M:
        out = skinny_matmul_w8(rows, weight, weight_scale, bias, x_qmax, row_absmax=row_absmax)
    else:
        codes, scales = quantize_rows(rows, weight.dtype, x_qmax, row_absmax)
        if weight.dtype == FP8_DTYPE and scaled_mm_fits(m, n, k):
            out = torch._scaled_mm(
                codes,
                weight.t(),
                scale_a=scales[:, None],
                scale_b=weight_scale[None, :],
                bias=None if bias is None else bias.to(torch.bfloat16),
                out_dtype=torch.bfloat16,
            )
            out = out if x.dtype == torch.bfloat16 else out.to(x.dtype)
        else:
            out = w8a8_matmul(codes, scales, weight, weight_scale, bias, x.dtype)
    return out.view(*shape[:-1], n)
