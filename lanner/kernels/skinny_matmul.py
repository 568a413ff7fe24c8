"""Triton skinny matmul: ``x @ weight.T (+ bias)`` for a few rows of x (decode at batch
1-16), streaming the [N, K] nn.Linear weight once at close to copy bandwidth.

At M = 1-16 a linear is a GEMV whose only cost is reading the weight, and cuBLAS's tilings
(built for M >= 64) reach about 40 % of copy bandwidth there. Here every program owns
BLOCK_N weight rows (and, with split-K, one K range of them), streams [BLOCK_N, BLOCK_K]
tiles global -> shared memory through a cp.async pipeline NUM_STAGES deep, and multiplies
each tile by all rows of x, so the weight is read once whatever M is. Two inner products:

- ``use_dot`` (default): x padded to 16 rows (the padding is masked, so it costs no
  memory traffic) and ``tl.dot`` on tensor cores. The tensor-core work is wasted 16x at
  M = 1 but is still far below their rate at HBM speed, and it is the cheapest in issue
  slots: about 1.5-3.5 SASS instructions per weight element on sm_90 (ldmatrix + mma)
  against 3.5 for the elementwise M = 1 loop and 15-30 for elementwise M = 8 (8 FMAs
  per weight element plus the conversions), where the loop would become issue-bound.
  fp32 inputs take Triton's exact "ieee" dot (CUDA-core FMAs): correct but slow, for
  tests and references rather than serving.
- elementwise (``use_dot=False``): [BLOCK_M, BLOCK_N, BLOCK_K] fp32 products accumulated
  in registers and summed over K once, after the loop. Registers grow with BLOCK_M, so it
  suits M = 1-2; kept so that GPU sweeps can compare it.

Split-K: when N / BLOCK_N gives too few programs to fill the SMs, the K range is cut into
``split_k`` chunks of whole BLOCK_K tiles and each program writes fp32 partials to a
workspace [split_k, M, N]. With ``fused_reduce`` (default) the last program of an output
tile to arrive (an int32 atomic counter per tile, release/acquire) adds the partials,
adds the bias, casts, and zeroes its counter for the next launch; without it a second
small kernel does the same. Either way the splits are added in index order whichever
program arrives last, so results are deterministic and the two modes agree bitwise. No
host syncs: the launch is CUDA-graph capturable (the counter buffer is allocated by the
first split-K call, which must come before capture). Two fused split-K launches running
at the same time on different streams of one device would share counters: don't.

Quantized weights (``skinny_matmul_w8``, ``skinny_matmul_w4``): the same kernel streams
8-bit or 4-bit weight tiles instead (W_FORMAT), widens them in registers to the
activations' dtype, exactly (kernels/weight_codes.py), and multiplies as above, so a
decode row costs the quantized bytes:
- fp8 e4m3 / int8 [N, K] with one fp32 scale per output channel, applied to the fp32
  sums once at the end; both inner products (elementwise widens to fp32). W8A8 (x_qmax,
  what the model runs: the checkpoints' dynamic per-token activation scheme): every
  program first reads its rows over the whole K for their absmax (from L2 after the
  first program: 1-16 rows), then rounds each x tile to the weight's 8-bit grid as
  quant_reference.quantize_rows does, kept in x's dtype (exact), and scales the sums by
  the row scales at the end; no extra launch (a row-parallel rank's rows, slices of
  longer ones, read the given absmax of the whole rows instead). W8A16 (no x_qmax): x
  as it is.
- int4 in lanner's plane layout (kernels/quant_reference.py) with per-group scales and
  zero points: each step loads a [BLOCK_N, BLOCK_K / 4] block of 16-bit words, and for
  each of its four nibble planes (BLOCK_K / 4 consecutive k each) multiplies q - zero,
  widened exactly, by the matching x columns on tensor cores into fresh fp32 sums, which
  it scales by the group's scale into the accumulator: exact up to fp32 summation. The
  weights are the left operand (out^T = W x^T), so with 4 warps and BLOCK_N >= 64 the
  product is a Hopper wgmma that reads x from shared memory, no registers spent on it.
  With ``scale_weights`` (a tuned option) each plane's q - zero is multiplied by its
  group scale in registers instead, rounded once to x's dtype as the batched paths and
  dequantize-then-matmul do, and the four planes' products chain into one accumulator
  (no per-plane MMA wait and fp32 rescale).
  A single int4 row does not run this kernel but kernels/int4_gemv.py's GEMV (words
  streamed into registers and multiplied on the CUDA cores: the tile path's shared-memory
  staging and 16-row padding held it at 0.26-0.50 of copy bandwidth on the H200), and so
  do 2-16 rows where a tuned GEMV config (format INT4_GEMV) covers the shape;
  choose_int4_config decides, ``gemv=`` or LANNER_INT4_GEMV=0 overrides.

Before its PDL wait (kernels/pdl.py) every program asks L2 for the first NUM_STAGES
tiles of its weight rows (prefetch.global.L2, one 128-byte line an instruction): the
weights are read-only, so they stream in while the kernel before it (a norm, attention,
the activation) still runs, instead of starting once it has finished. Off unless
LANNER_SKINNY_PREFETCH=1: on the H200 it made W1 (bf16, batch 1) slower, 4.63 ms a token
against 4.14 without (benchmarks/results/20261201-161237-W1.json and -161249-W1.json).

Configs: choose_config's rules, unless a measured config covers the (format, rows 1 or
2-16, N, K): first one installed by install_tuned_configs, then the committed table of
this card (tuned/*.json, written by benchmarks/tune_quant.py, read at the first CUDA
launch; LANNER_TUNED_CONFIGS=0 ignores it). Other cards keep the rules.

Batch invariance (row i of an M-row call equals that row alone, bitwise): for the dot
path it holds by construction for M <= 16 at a fixed config. BLOCK_M is 16 for every M
and M is not specialized on, so every such M runs the same binary; each output row is
its own x row times the same weight tiles in the same K order, and padded or masked rows
never mix into it. For the elementwise path BLOCK_M follows M, so M = 1 and M = 8 run
different binaries; their K order matches as long as Triton lays out the K axis the same
for both. Across configs: split_k and use_dot change the rounding; on the dot path
block_n, block_k, num_warps and num_stages should not, since the sum runs through the
same 16-wide MMA k-steps in K order whatever the tiles (the CPU interpreter's numpy
matmul does not keep this). choose_config gives M = 2..16 one dot config, so those rows
are batch invariant end to end (benchmarks/kernels_linear.py checks each row against a
2-row call on the GPU); a single row takes the elementwise path, faster there, and
rounds differently, as cuBLAS's kernels for different M do.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.quant_reference import FP8_DTYPE, INT4_PLANE, INT4_TILE
from lanner.kernels.rms_norm import cast_rounded
from lanner.kernels.weight_codes import (
    int4_plane,
    int4_plane_scaled,
    int4_zero_offset,
    round_to_8bit,
    widen_8bit,
)

# Rows of x one program multiplies; a larger M launches cdiv(M, 16) program rows, each
# streaming the weight again (use_skinny hands such batches to cuBLAS).
MAX_BLOCK_M = 16
# tl.dot needs at least 16 along each dim.
DOT_BLOCK = 16
# Streaming multiprocessors of the card choose_config plans for (H100 SXM).
NUM_SMS = 132
# Arrival counters for fused split-K, one per (N block, M block) tile; tiles beyond this
# fall back to the separate reduce kernel.
MAX_TILES = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Measured configs that override choose_config's rules (install_tuned_configs), and the
# shipped ones measured on this card (tuned/*.json, read at the first CUDA launch, used
# where _TUNED has no entry). LANNER_TUNED_CONFIGS=0 keeps the rules alone.
_TUNED: dict[tuple[str, int, int, int], SkinnyConfig] = {}
_SHIPPED: dict[tuple[str, int, int, int], SkinnyConfig] = {}
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"
_SHIPPED_STATE = {"read": os.environ.get("LANNER_TUNED_CONFIGS", "1") == "0"}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows up to which use_skinny picks this kernel over cuBLAS.
SKINNY_MAX_M = 16
# Triton's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits; under
# it the dot path upcasts them to fp32 first (exact: the GPU's MMA multiplies bf16 exactly
# and accumulates in fp32 too).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
# Weight formats (W_FORMAT): the activations' dtype, fp8 e4m3, int8, int4 planes.
DENSE, FP8, INT8, INT4 = "dense", "fp8", "int8", "int4"
# The tuned-table format of int4's GEMV configs (kernels/int4_gemv.py): kept apart from
# INT4's tile configs, so that both stay selectable for the same shape.
INT4_GEMV = "int4-gemv"
# Whether skinny_matmul_w4 may run the GEMV: for one row by rule, for 2-16 rows where a
# tuned GEMV config covers the shape. LANNER_INT4_GEMV=0 (or use_int4_gemv(False)) keeps
# the tile path everywhere, for comparison.
_GEMV_STATE = {"enabled": os.environ.get("LANNER_INT4_GEMV", "1") != "0"}
_FORMAT_IDS = {DENSE: 0, FP8: 1, INT8: 2, INT4: 3}
_W_DENSE = tl.constexpr(0)
_W_FP8 = tl.constexpr(1)
_W_INT8 = tl.constexpr(2)
_W_INT4 = tl.constexpr(3)
_PLANE = tl.constexpr(INT4_PLANE)
_TILE_GAP = tl.constexpr(INT4_TILE - INT4_PLANE)
# L2 prefetch of each program's first weight tiles before it waits on the kernel before
# it (PDL): on with LANNER_SKINNY_PREFETCH=1 (it measured slower), never in the
# interpreter (no PTX).
PREFETCH = os.environ.get("LANNER_SKINNY_PREFETCH", "0") == "1" and not bool(
    triton.knobs.runtime.interpret
)
_PTX = not bool(triton.knobs.runtime.interpret)
_PREFETCH_LINE = 128  # bytes of an L2 line
_PREFETCH_L2 = tl.constexpr("prefetch.global.L2 [$1];\nmov.u32 $0, 0;")


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of one skinny_matmul call (which of them change the rounding: see
    the module docstring)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    use_dot: bool = True
    fused_reduce: bool = True
    # int4 only: each plane's weights scaled in registers, rounded once to x's dtype, so
    # that the four planes' products chain into one accumulator on the tensor cores
    # (False: each plane's fp32 sums scaled apart, exact up to fp32 summation).
    scale_weights: bool = False
    # fp8 / int8 W8A8 only: quantize the rows in a launch of their own first
    # (w8a8_matmul.quantize_rows) and read their codes, instead of every program
    # quantizing them itself; the same codes and products, so the same bits.
    prequantize: bool = False
    # The int4 GEMV (kernels/int4_gemv.py): each next step's words loaded into registers
    # before this step's math (a register double buffer instead of cp.async stages).
    # fp8 / int8: each program asks L2 for its first weight tiles before its PDL wait and
    # the rows' absmax pass (what LANNER_SKINNY_PREFETCH=1 does for every launch), so
    # that a short launch's weights are on their way while the rows are quantized.
    prefetch: bool = False
    # int4 GEMV entries (INT4_GEMV keys) only: False records that the tile path measured
    # faster at the key, so choose_int4_config keeps it there.
    gemv: bool = True


@triton.jit
def _dot_tiles(
    x_rows,
    x_row_mask,
    x_scale,
    w_rows,
    k_start,
    k_stop,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    W_FORMAT: tl.constexpr,
    QUANT_X: tl.constexpr,
    X_CODES: tl.constexpr,
    X_DTYPE: tl.constexpr,
):
    """sum over k in [k_start, k_stop) of x[m, k] * w[n, k] -> fp32 [BLOCK_M, BLOCK_N] on
    tensor cores; x_rows [BLOCK_M] and w_rows [BLOCK_N] point at the rows' first elements.
    8-bit weights (W_FORMAT) are widened to x's dtype first (unscaled codes); with QUANT_X
    each x is first divided by its row's x_scale and rounded to the weight's 8-bit grid
    (unscaled codes too: the caller multiplies the sums by x_scale); with X_CODES x holds
    such codes already (their bytes), widened to X_DTYPE."""
    k_offsets = tl.arange(0, BLOCK_K)
    w_ptrs = w_rows[:, None] + (k_start + k_offsets)[None, :]
    x_ptrs = x_rows[:, None] + (k_start + k_offsets)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=x_row_mask[:, None], other=0)
        else:
            in_range = (k + k_offsets < k_stop)[None, :]
            w = tl.load(w_ptrs, mask=in_range, other=0)
            x = tl.load(x_ptrs, mask=x_row_mask[:, None] & in_range, other=0)
        if X_CODES:
            x = widen_8bit(x, W_FORMAT == _W_FP8, X_DTYPE)
        elif QUANT_X:
            x_codes = round_to_8bit(x.to(tl.float32) / x_scale[:, None], W_FORMAT == _W_FP8)
            x = x_codes.to(x.dtype)
        if W_FORMAT != _W_DENSE:
            w = widen_8bit(w, W_FORMAT == _W_FP8, x.dtype)
        if _INTERPRETED and w.dtype != tl.float32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc


@triton.jit
def _elementwise_tiles(
    x_rows,
    x_row_mask,
    x_scale,
    w_rows,
    k_start,
    k_stop,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    W_FORMAT: tl.constexpr,
    QUANT_X: tl.constexpr,
    X_CODES: tl.constexpr,
):
    """The same sum as _dot_tiles with fp32 multiply-adds on the CUDA cores."""
    k_offsets = tl.arange(0, BLOCK_K)
    # Both operands are 3-D from the start ([1, N, K] and [M, 1, K]): a broadcast keeps the
    # weight load's coalesced layout, where expanding a 2-D load would fall back to
    # Triton's default layout, which splits each 16-byte vector across threads.
    w_ptrs = w_rows[None, :, None] + (k_start + k_offsets)[None, None, :]
    x_ptrs = x_rows[:, None, None] + (k_start + k_offsets)[None, None, :]
    x_mask = x_row_mask[:, None, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=x_mask, other=0)
        else:
            in_range = (k + k_offsets < k_stop)[None, None, :]
            w = tl.load(w_ptrs, mask=in_range, other=0)
            x = tl.load(x_ptrs, mask=x_mask & in_range, other=0)
        if W_FORMAT == _W_DENSE:
            w = w.to(tl.float32)
        else:
            w = widen_8bit(w, W_FORMAT == _W_FP8, tl.float32)
        x = widen_8bit(x, W_FORMAT == _W_FP8, tl.float32) if X_CODES else x.to(tl.float32)
        if QUANT_X:
            x = round_to_8bit(x / x_scale[:, None, None], W_FORMAT == _W_FP8)
        # Summed across threads once after the loop: a per-step tl.sum would shuffle
        # every step.
        acc += x * w
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return tl.sum(acc, axis=2)


@triton.jit
def _int4_tiles(
    x_rows,
    x_row_mask,
    w_rows,
    scales_ptr,
    zeros_ptr,
    rows_n,
    N,
    K,
    num_groups,
    k_start,
    k_stop,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr,
):
    """sum over k in [k_start, k_stop) of x[m, k] * (q[n, k] - zero) * scale -> fp32
    [BLOCK_M, BLOCK_N] for int4 weights in the plane layout (w_rows point at each row's
    16-bit words; k_start is a multiple of a tile). Each step reads BLOCK_K / 4 words of
    each row and multiplies their four planes (BLOCK_K / 4 consecutive k each, within one
    group) by the matching x columns, scaling each plane's fp32 sums once; with
    SCALE_WEIGHTS each plane's weights are scaled instead (rounded once to x's dtype) and
    the four products accumulate in one chain of MMAs."""
    dtype: tl.constexpr = x_rows.dtype.element_ty
    STEP: tl.constexpr = BLOCK_K // 4
    offsets = tl.arange(0, STEP)
    n_mask = rows_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    word_stop = tl.cdiv(k_stop, 4 * _PLANE) * _PLANE
    for word in tl.range(k_start // 4, word_stop, STEP, num_stages=NUM_STAGES):
        words = tl.load(w_rows[:, None] + (word + offsets)[None, :])
        # The step's first k: word p of tile t holds k = 512 t + 128 s + p.
        k_base = tl.multiple_of(word + (word // _PLANE) * _TILE_GAP, STEP)
        for plane in tl.static_range(4):
            k_first = k_base + plane * _PLANE
            ks = k_first + offsets
            if EVEN_K:
                x = tl.load(x_rows[:, None] + ks[None, :], mask=x_row_mask[:, None], other=0.0)
            else:
                x_mask = x_row_mask[:, None] & (ks < K)[None, :]
                x = tl.load(x_rows[:, None] + ks[None, :], mask=x_mask, other=0.0)
            group = tl.minimum(k_first // GROUP, num_groups - 1)
            scale = tl.load(scales_ptr + group * N + rows_n, mask=n_mask, other=0.0)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + group * N + rows_n, mask=n_mask, other=0)
            else:
                zero = tl.full((BLOCK_N,), 8, tl.int32)
            zero_offset = tl.broadcast_to(int4_zero_offset(zero, dtype)[:, None], (BLOCK_N, STEP))
            if SCALE_WEIGHTS:
                plane_scale = tl.broadcast_to(cast_rounded(scale, dtype)[:, None], (BLOCK_N, STEP))
                w = int4_plane_scaled(words, zero_offset, plane_scale, plane, dtype)
            else:
                w = int4_plane(words, zero_offset, plane, dtype)
            if _INTERPRETED and w.dtype != tl.float32:
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            if SCALE_WEIGHTS:
                if IEEE:
                    acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, tl.trans(x), acc)
            else:
                if IEEE:
                    sums = tl.dot(w, tl.trans(x), input_precision="ieee")
                else:
                    sums = tl.dot(w, tl.trans(x))
                acc += sums * scale.to(tl.float32)[:, None]
    return tl.trans(acc)


# M is not specialized on (Triton would otherwise compile M == 1 apart), so that every
# M <= BLOCK_M runs one binary: part of the batch-invariance argument above. Nor is the
# split stride M * N, which would otherwise compile per divisibility inside a step.
@triton.jit(do_not_specialize=["M", "partial_stride_split"])
def _skinny_matmul_kernel(
    x_ptr,
    x_scale_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    x_absmax_ptr,
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
    x_qmax,
    W_FORMAT: tl.constexpr,
    QUANT_X: tl.constexpr,
    X_CODES: tl.constexpr,
    GIVEN_ABSMAX: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SCALE_WEIGHTS: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid: (N blocks, K splits, M blocks); neighbouring programs read neighbouring rows.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N read a copy of the last row instead of being masked, so the
    # weight loads carry no row mask; their results are never stored.
    w_rows = w_ptr + tl.minimum(rows_n, N - 1).to(tl.int64) * w_stride_row
    if PREFETCH_LINES > 0:
        # The weights are read-only: they may stream into L2 while the kernel before this
        # one still runs (nothing here reads what it writes).
        _prefetch_rows(w_rows, k_start // 4 if W_FORMAT == _W_INT4 else k_start, PREFETCH_LINES)
    pdl_start(PDL)

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_row_mask = rows_m < M
    x_rows = x_ptr + rows_m.to(tl.int64) * x_stride_row
    if X_CODES:
        # Rows quantized already (skinny_matmul_w8 with prequantize): their scales.
        x_scale = tl.load(x_scale_ptr + rows_m, mask=x_row_mask, other=1.0)
    else:
        x_scale = _row_scales(
            x_rows, x_row_mask, rows_m, x_absmax_ptr, K, x_qmax, BLOCK_M, QUANT_X, GIVEN_ABSMAX
        )

    if W_FORMAT == _W_INT4:
        acc = _int4_tiles(
            x_rows,
            x_row_mask,
            w_rows,
            scale_ptr,
            zero_ptr,
            rows_n,
            N,
            K,
            num_groups,
            k_start,
            k_stop,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP,
            HAS_ZEROS,
            EVEN_K,
            IEEE,
            NUM_STAGES,
            SCALE_WEIGHTS,
        )
    elif USE_DOT:
        acc = _dot_tiles(
            x_rows,
            x_row_mask,
            x_scale,
            w_rows,
            k_start,
            k_stop,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            IEEE,
            NUM_STAGES,
            W_FORMAT,
            QUANT_X,
            X_CODES,
            out_ptr.dtype.element_ty,
        )
    else:
        acc = _elementwise_tiles(
            x_rows,
            x_row_mask,
            x_scale,
            w_rows,
            k_start,
            k_stop,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            NUM_STAGES,
            W_FORMAT,
            QUANT_X,
            X_CODES,
        )
    if W_FORMAT != _W_DENSE and W_FORMAT != _W_INT4:
        # Per-channel scales, once on the fp32 sums (a split's partial is scaled alike).
        acc *= tl.load(scale_ptr + rows_n, mask=rows_n < N, other=0.0)[None, :]
    if QUANT_X or X_CODES:
        acc *= x_scale[:, None]

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
def _prefetch_rows(w_rows, first, LINES: tl.constexpr):
    """Asks L2 for the LINES 128-byte lines of each weight row from element ``first`` on
    (prefetch.global.L2: no registers, no wait, never faults the kernel)."""
    row_bytes = (w_rows + first).to(tl.pointer_type(tl.uint8))
    lines = row_bytes[:, None] + (tl.arange(0, LINES) * 128)[None, :]
    tl.inline_asm_elementwise(_PREFETCH_L2, "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _row_scales(
    x_rows,
    x_row_mask,
    rows_m,
    x_absmax_ptr,
    K,
    x_qmax,
    BLOCK_M: tl.constexpr,
    QUANT_X: tl.constexpr,
    GIVEN_ABSMAX: tl.constexpr,
):
    """Per-token activation scales of the program's rows, absmax / x_qmax over the whole K
    (1 for a row of zeros; quant_reference.quantize_rows's rule), read from L2 where the
    1-16 rows sit after the first program; with GIVEN_ABSMAX the absmax of each row is
    read from x_absmax_ptr instead (a row-parallel rank's slice of rows scaled by the
    whole rows'); ones without QUANT_X."""
    scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    if QUANT_X and GIVEN_ABSMAX:
        row_max = tl.load(x_absmax_ptr + rows_m, mask=x_row_mask, other=0.0)
        scale = tl.where(row_max > 0, row_max / x_qmax, 1.0)
    elif QUANT_X:
        # 4096 values a step, in registers, whatever BLOCK_M is.
        CHUNK: tl.constexpr = 4096 // BLOCK_M
        offsets = tl.arange(0, CHUNK)
        absmax = tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32)
        for k in range(0, K, CHUNK):
            mask = x_row_mask[:, None] & (k + offsets < K)[None, :]
            x = tl.load(x_rows[:, None] + (k + offsets)[None, :], mask=mask, other=0.0)
            absmax = tl.maximum(absmax, tl.abs(x.to(tl.float32)))
        row_max = tl.max(absmax, axis=1)
        scale = tl.where(row_max > 0, row_max / x_qmax, 1.0)
    return scale


@triton.jit
def split_k_epilogue(
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
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Stores a program's fp32 sums acc [BLOCK_M, BLOCK_N] (rows rows_m, columns rows_n):
    with the bias and rounded to the output dtype, or, under split-K (PARTIAL), as this
    split's partial, the last split of the tile to arrive adding them (FUSED_REDUCE; see
    the module docstring). Grid: (N blocks, K splits, M blocks). Shared by the tiled
    quantized kernels (w8a8_matmul, w4a16_matmul)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    mask = x_row_mask[:, None] & (rows_n < N)[None, :]
    offsets = rows_m.to(tl.int64)[:, None] * out_stride_row + rows_n[None, :]
    if not PARTIAL:
        _finish(acc, bias_ptr, out_ptr, rows_n, N, offsets, mask, HAS_BIAS)
    else:
        # fp32 sums over this program's K chunk.
        split_offset = pid_k.to(tl.int64) * partial_stride_split
        tl.store(partial_ptr + split_offset + offsets, acc, mask=mask)
        if FUSED_REDUCE:
            # The last of the tile's split programs to arrive adds all splits. The barrier
            # orders every thread's partial stores before the (one-thread) release below;
            # the acquire side reads the partials from L2 (.cg), past any stale L1 line.
            tl.debug_barrier()
            counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
            num_splits = tl.num_programs(1)
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                partial_ptrs = partial_ptr + offsets
                for _ in range(num_splits):
                    total += tl.load(partial_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                    partial_ptrs += partial_stride_split
                _finish(total, bias_ptr, out_ptr, rows_n, N, offsets, mask, HAS_BIAS)
                # Zero again for the next launch (and the next replay of a CUDA graph).
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _finish(acc, bias_ptr, out_ptr, rows_n, N, offsets, mask, HAS_BIAS: tl.constexpr):
    """Adds the bias to fp32 sums and stores them rounded to the output dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + offsets, cast_rounded(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    N,
    num_splits,
    partial_stride_split,
    out_stride_row,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    # One program per (row, column block); the splits are added in index order, so the
    # sum is the same on every run.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    partial_ptrs = partial_ptr + row * N + cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(num_splits):
        acc += tl.load(partial_ptrs, mask=mask, other=0.0)
        partial_ptrs += partial_stride_split
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = cast_rounded(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride_row + cols, out, mask=mask)


@functools.cache
def choose_config(
    m: int, n: int, k: int, weight_format: str = DENSE, group_size: int = 128
) -> SkinnyConfig:
    """Launch parameters for x [m, k] @ weight[n, k].T, x in bf16/fp16. Dense weights, from
    the H100 sweep of benchmarks/kernels_linear.py (results 20261127-0946*, the 0.6B and 8B
    shapes):

    - m == 1: the elementwise path with 1024-wide K tiles, 4 rows a program (8 for
      K <= 1024, and 16 x 512 for the 8B down projection's K = 14336), 4 warps. It beat
      cuBLAS on every shape (llama3-8b: 0.85-1.07 of copy bandwidth with the weight cold
      in L2 vs 0.77-0.96 for cuBLAS).
    - m >= 2: the dot path with [16, 512] tiles, 2 warps, 3 stages; an N too small to
      give every SM a program (the 0.6B o and down projections) takes [32, 256] tiles
      and 4-way split-K instead.
    One binary serves every m in 2..16, which keeps those rows batch invariant; m == 1
    rounds differently (its own inner product), as cuBLAS's kernels for different m do.

    Quantized weights: see _quantized_config.
    """
    key = (weight_format, 1 if m == 1 else MAX_BLOCK_M, n, k)
    tuned = _TUNED.get(key, _SHIPPED.get(key))
    # (int4 configs are swept at group 128: one whose steps span more than a group's plane
    # does not apply.)
    if tuned is not None and (
        weight_format != INT4 or tuned.block_k // 4 <= min(INT4_PLANE, group_size)
    ):
        return tuned
    if weight_format != DENSE:
        return _quantized_config(m, n, k, weight_format, group_size)
    if m == 1:
        block_k = min(1024, max(16, triton.next_power_of_2(k)))
        if k > 8192:
            return SkinnyConfig(16, 512, 1, num_warps=4, num_stages=4, use_dot=False)
        if k <= 1024:
            return SkinnyConfig(8, block_k, 1, num_warps=4, num_stages=4, use_dot=False)
        return SkinnyConfig(4, block_k, 1, num_warps=4, num_stages=6, use_dot=False)
    block_k = min(512, max(DOT_BLOCK, triton.next_power_of_2(k)))
    if triton.cdiv(n, DOT_BLOCK) < NUM_SMS:
        block_k = min(256, block_k)
        split_k = default_split_k(n, k, 32, block_k)
        return SkinnyConfig(32, block_k, split_k, num_warps=4, num_stages=4, use_dot=True)
    return SkinnyConfig(DOT_BLOCK, block_k, 1, num_warps=2, num_stages=3, use_dot=True)


def _quantized_config(m: int, n: int, k: int, weight_format: str, group_size: int) -> SkinnyConfig:
    """First guesses for quantized weights, not yet swept on a GPU (benchmarks/
    kernels_linear.py --quant --sweep times the alternatives; its printed table replaces
    these): the dense configs' bytes a step at the narrower weights.

    - fp8 / int8, m == 1: elementwise over [8, 1024] tiles (16 x 1024 for K > 8192), whose
      e4m3 -> fp32 widening costs about 3.5 instructions a code against 8 a code of issue
      budget at copy bandwidth (scripts/kernel_sass.py); m >= 2: the dot path over
      [128, 256] tiles with 4 warps: the rows' in-kernel quantization (a division and
      a rounding per x value, for all 16 padded rows) costs per weight tile 16 / block_n
      of its x work, and at 128 rows the main loop is about 5 SASS instructions a weight
      code (kernel_sass.py fp8_w8a8:8x28672x4096; 9.5 with spills at [32, 512], 2 warps).
    - int4: [64, 512] steps (four planes of 128 words, or of the group when it is
      smaller), 4 warps (Hopper wgmma), split-K until every SM has a program."""
    if weight_format == INT4:
        block_k = 4 * min(INT4_PLANE, group_size)
        tiles = triton.cdiv(k, INT4_TILE)
        split_k = 1
        while triton.cdiv(n, 64) * split_k < NUM_SMS and 4 * split_k <= tiles:
            split_k *= 2
        return SkinnyConfig(64, block_k, split_k, num_warps=4, num_stages=3, use_dot=True)
    if m == 1:
        block_n = 16 if k > 8192 else 8
        block_k = min(1024, max(16, triton.next_power_of_2(k)))
        split_k = default_split_k(n, k, block_n, block_k)
        return SkinnyConfig(block_n, block_k, split_k, num_warps=4, num_stages=4, use_dot=False)
    block_k = min(256, max(DOT_BLOCK, triton.next_power_of_2(k)))
    split_k = default_split_k(n, k, 128, block_k)
    return SkinnyConfig(128, block_k, split_k, num_warps=4, num_stages=3, use_dot=True)


def install_tuned_configs(configs: dict[tuple[str, int, int, int], SkinnyConfig]) -> None:
    """Replaces choose_config's rule for the given (weight format, rows, N, K) with a
    measured config: rows 1 for a single row, MAX_BLOCK_M for every M in 2..16 (one config,
    which keeps them batch invariant). For GPU sweeps (benchmarks/kernels_linear.py --quant
    --sweep writes them, engine_workloads.py --skinny-configs reads them); call before the
    engine captures its CUDA graphs."""
    _check_tuned(configs)
    _TUNED.clear()
    _TUNED.update(configs)
    choose_config.cache_clear()
    choose_int4_config.cache_clear()
    _plan.cache_clear()


def _check_tuned(configs: dict[tuple[str, int, int, int], SkinnyConfig]) -> None:
    for (weight_format, rows, _, _), config in configs.items():
        known = weight_format in _FORMAT_IDS or weight_format == INT4_GEMV
        if not known or rows not in (1, MAX_BLOCK_M):
            raise ValueError(f"bad tuned key ({weight_format!r}, {rows}): rows is 1 or 16")
        if rows > 1 and not config.use_dot and weight_format != INT4_GEMV:
            raise ValueError("rows 2-16 run the dot path (use_dot=True)")
        if config.prequantize and weight_format not in (FP8, INT8):
            raise ValueError("prequantize is for fp8 / int8 weights (W8A8) only")
        if config.prefetch and weight_format not in (INT4_GEMV, FP8, INT8):
            raise ValueError(f"prefetch is for the int4 GEMV ({INT4_GEMV!r}), fp8 and int8 only")


def tuned_entries_to_configs(entries: list[dict]) -> dict[tuple[str, int, int, int], SkinnyConfig]:
    """The JSON entries benchmarks/tune_quant.py writes ({"format", "rows", "N", "K",
    "config": SkinnyConfig's fields}, other fields ignored) as install_tuned_configs'
    mapping."""
    configs = {}
    for entry in entries:
        key = (entry["format"], int(entry["rows"]), int(entry["N"]), int(entry["K"]))
        configs[key] = SkinnyConfig(**entry["config"])
    _check_tuned(configs)
    return configs


def shipped_configs(device_name: str, directory: Path = SHIPPED_DIR) -> dict:
    """The configs measured on ``device_name`` (torch.cuda.get_device_name) in the
    committed files tuned/*.json, each {device name: {"configs": [entries], ...}}; empty
    for a card none of them covers (choose_config's rules apply there)."""
    configs: dict[tuple[str, int, int, int], SkinnyConfig] = {}
    for path in sorted(directory.glob("*.json")):
        table = json.loads(path.read_text())
        if device_name in table:
            configs.update(tuned_entries_to_configs(table[device_name]["configs"]))
    return configs


def _read_shipped_configs_once(tensor: torch.Tensor) -> None:
    if not _SHIPPED_STATE["read"] and tensor.is_cuda:
        _read_shipped_configs(tensor.device)


def _read_shipped_configs(device: torch.device) -> None:
    """At the first CUDA launch: the shipped configs of this card, where no explicitly
    installed config (install_tuned_configs) covers the same key."""
    _SHIPPED_STATE["read"] = True
    _SHIPPED.clear()
    _SHIPPED.update(shipped_configs(torch.cuda.get_device_name(device)))
    choose_config.cache_clear()
    choose_int4_config.cache_clear()
    _plan.cache_clear()


def use_shipped_configs(enabled: bool) -> None:
    """Turns the shipped tuned configs on (read again at the next CUDA launch) or off
    (choose_config's rules and installed configs only: what tuning compares against)."""
    _SHIPPED.clear()
    _SHIPPED_STATE["read"] = not enabled
    choose_config.cache_clear()
    choose_int4_config.cache_clear()
    _plan.cache_clear()


def use_int4_gemv(enabled: bool) -> None:
    """Lets skinny_matmul_w4 run the int4 GEMV where it applies (True, the default unless
    LANNER_INT4_GEMV=0) or keeps the tile path everywhere (False)."""
    _GEMV_STATE["enabled"] = enabled
    choose_int4_config.cache_clear()


@functools.cache
def choose_int4_config(
    m: int, n: int, k: int, group_size: int, gemv: bool | None = None
) -> tuple[bool, SkinnyConfig]:
    """(whether to run the GEMV, its config) for x [m, k] @ an int4 weight [n, k]. gemv
    None: the GEMV for a single row, and for 2-16 rows where a tuned GEMV config covers
    (rows 16, n, k), except where a tuned INT4_GEMV entry has gemv False (the tile path
    measured faster there), unless use_int4_gemv(False); True / False force one kernel. Either
    kernel takes its measured config first (tuned tables: INT4_GEMV and INT4 keys), else
    its rule (_gemv_rule, _quantized_config)."""
    key = (INT4_GEMV, 1 if m == 1 else MAX_BLOCK_M, n, k)
    tuned = _TUNED.get(key, _SHIPPED.get(key))
    if gemv is None:
        # A tuned entry says which kernel measured faster at its key (its gemv field).
        gemv = _GEMV_STATE["enabled"] and (tuned.gemv if tuned is not None else m == 1)
    if not gemv:
        return False, choose_config(m, n, k, INT4, group_size)
    return True, tuned if tuned is not None else _gemv_rule(n, k)


def _gemv_rule(n: int, k: int) -> SkinnyConfig:
    """The int4 GEMV's config where no measured one covers the shape (benchmarks/
    gemv_w4.py measures W1's), from bytes in flight: 8 rows a program on 2 warps whose one
    16-byte load a thread covers a step (block_k = 1024 x num_warps: 8 KB a program-step),
    1 warp where that does not divide a row; each next step's words prefetched into
    registers (prefetch: the loads stay in flight while the warp computes, ~4.3 SASS
    instructions a code at one row, about the issue rate's ~4 at copy bandwidth, so the
    math does not hide behind the loads unless they overlap); split-K until there are 4
    programs an SM (an SM needs ~32 KB in flight at 4.2 TB/s over 132 SMs and ~1 µs of
    latency), keeping two steps a split for the prefetch to overlap. On the H200 (1ad2d2d,
    20261201-182140-gemv-w4.json) it came within 1-13 % of the best of 36 configs on W1's
    four shapes (whose measured configs ship in tuned/h200_quant.json)."""
    row_ints = triton.cdiv(k, INT4_TILE) * INT4_TILE // 8
    num_warps = 2 if row_ints % 256 == 0 else 1
    block_n, block_k = 8, 1024 * num_warps
    steps = triton.cdiv(row_ints, block_k // 8)
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < 4 * NUM_SMS and 4 * split_k <= steps:
        split_k *= 2
    return SkinnyConfig(
        block_n, block_k, split_k, num_warps, num_stages=1, use_dot=False, prefetch=True
    )


def default_split_k(n: int, k: int, block_n: int, block_k: int) -> int:
    """The smallest power-of-two split that gives about 3/4 of a program per SM, keeping
    at least two block_k tiles per split."""
    split_k = 1
    k_tiles = triton.cdiv(k, block_k)
    while triton.cdiv(n, block_n) * split_k < 3 * NUM_SMS // 4 and 2 * split_k <= k_tiles // 2:
        split_k *= 2
    return split_k


def use_skinny(m: int, n: int, k: int) -> bool:
    """Whether a linear of m rows over an [n, k] weight should run skinny_matmul rather
    than cuBLAS: every batch of 1 to SKINNY_MAX_M rows. On the H100 it matched or beat
    cuBLAS for every 0.6B and 8B projection and LM head at m = 1-16 (the 0.6B o
    projection at m = 8 within 1 %); above 16 rows each extra 16 re-reads the weight."""
    del n, k
    return 0 < m <= SKINNY_MAX_M


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    fused_reduce: bool | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` for x [..., K] with few rows and an
    [N, K] weight, in fp32/fp16/bf16 with fp32 accumulation; the output has x's dtype.

    Parameters left None come from ``choose_config(M, N, K)``. block_n and block_k are
    powers of two (with use_dot at least 16); split_k > 1 cuts K into that many chunks of
    whole block_k tiles (fewer if K has fewer tiles), summed by the last program of each
    output tile (fused_reduce) or by a second kernel. Capturable in a CUDA graph once one
    split-K call has run outside the capture (it allocates the tile counters).
    """
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}; cast one of them")
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit x @ weight.T"
        )
    overrides = (
        block_n, block_k, split_k, num_warps, num_stages, use_dot, fused_reduce, None, None
    )  # fmt: skip
    return _run(x, weight, DENSE, weight.shape[0], None, None, 0, 1, bias, overrides)


def skinny_matmul_w8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_qmax: float | None = None,
    *,
    row_absmax: torch.Tensor | None = None,
    **config: int | bool | None,
) -> torch.Tensor:
    """x [..., K] @ (weight * weight_scale[:, None]).T (+ bias) for an fp8 e4m3 or int8
    weight [N, K] with one fp32 scale per output channel, fp32 sums, output in x's dtype.
    x_qmax None: W8A16, x as it is (no activation rounding). x_qmax given: W8A8, each row
    of x quantized to the weight's dtype in the kernel exactly as quant_reference.
    quantize_rows does (scale absmax / x_qmax), so no extra launch; ``row_absmax`` (fp32,
    one a row of x) gives each row's absmax instead of reading it from x. ``config``:
    skinny_matmul's parameters (defaults from choose_config(M, N, K, "fp8" or "int8"))."""
    if weight.dtype not in (FP8_DTYPE, torch.int8) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D fp8 e4m3 or int8 tensor, got {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32:
        raise ValueError(
            f"weight_scale must be float32 of shape ({weight.shape[0]},), got "
            f"{weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if row_absmax is not None:
        if x_qmax is None:
            raise ValueError("row_absmax quantizes x (W8A8): it needs x_qmax")
        check_row_absmax(row_absmax, math.prod(x.shape[:-1]))
    fmt = FP8 if weight.dtype == FP8_DTYPE else INT8
    codes = weight.view(torch.uint8)  # the kernel reads bytes (weight_codes.widen_8bit)
    prequantize = config.pop("prequantize", None)
    overrides = _overrides(config)
    n, k = weight.shape
    if x_qmax is not None:
        _read_shipped_configs_once(x)
        m = math.prod(x.shape[:-1])
        if prequantize is None:
            prequantize = choose_config(min(max(m, 1), MAX_BLOCK_M), n, k, fmt).prequantize
        if prequantize:
            # (w8a8_matmul imports this module: imported here, not at the top.)
            from lanner.kernels.w8a8_matmul import quantize_rows

            rows, row_scales = quantize_rows(x.reshape(m, k), weight.dtype, x_qmax, row_absmax)
            out = _run(
                rows.view(torch.uint8),
                codes,
                fmt,
                n,
                weight_scale,
                None,
                0,
                1,
                bias,
                overrides,
                x_scales=row_scales,
                out_dtype=x.dtype,
            )
            return out.view(*x.shape[:-1], n)
    return _run(x, codes, fmt, n, weight_scale, None, 0, 1, bias, overrides, x_qmax, row_absmax)


def skinny_matmul_w4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    **config: int | bool | None,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for int4 W in the plane layout, packed int32
    [N, ceil(K / 512) * 64], with scales [groups, N] (any float dtype) and zeros
    [groups, N] uint8 codes (None: 8): W4A16, exact up to fp32 summation, output in x's
    dtype. ``config``: skinny_matmul's parameters (use_dot must stay True; block_k counts
    the codes of a step, four planes of block_k / 4, and divides 4 * min(group_size, 128)),
    and ``gemv``: True / False runs kernels/int4_gemv.py's GEMV / the tile path whatever
    choose_int4_config would pick (the GEMV takes block_n, block_k (a power of two, at
    least 1024 x num_warps), split_k, num_warps, num_stages, fused_reduce and prefetch)."""
    check_int4_operands(x.shape[-1], packed, scales, zeros, group_size)
    gemv = config.pop("gemv", None)
    if gemv is None and any(config.get(name) is not None for name in ("use_dot", "scale_weights")):
        gemv = False  # the tile path's own parameters
    k = x.shape[-1]
    if x.is_cuda:
        _read_shipped_configs_once(x)
    m = math.prod(x.shape[:-1])
    run_gemv, chosen = choose_int4_config(
        min(max(m, 1), MAX_BLOCK_M), packed.shape[0], k, group_size, gemv
    )
    if run_gemv:
        # (int4_gemv imports this module: imported here, not at the top.)
        from lanner.kernels.int4_gemv import int4_gemv

        names = (
            "block_n", "block_k", "split_k", "num_warps", "num_stages", "fused_reduce", "prefetch"
        )  # fmt: skip
        unknown = set(config) - set(names)
        if unknown:
            raise TypeError(f"unknown int4 GEMV launch parameters {sorted(unknown)}")
        params = {
            name: config.get(name) if config.get(name) is not None else getattr(chosen, name)
            for name in names
        }
        return int4_gemv(x, packed, scales, zeros, group_size, bias, **params)
    return _run(
        x,
        packed.view(torch.int16),
        INT4,
        packed.shape[0],
        scales,
        zeros,
        group_size,
        scales.shape[0],
        bias,
        _overrides(config),
    )


def check_row_absmax(row_absmax: torch.Tensor, m: int) -> None:
    """ValueError unless row_absmax is float32 [m], contiguous: one absmax a row of x."""
    if row_absmax.shape != (m,) or row_absmax.dtype != torch.float32:
        raise ValueError(
            f"row_absmax must be float32 of shape ({m},) (one per row of x), got "
            f"{row_absmax.dtype} {tuple(row_absmax.shape)}"
        )
    if not row_absmax.is_contiguous():
        raise ValueError("row_absmax must be contiguous")


def check_int4_operands(
    k: int,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> None:
    """ValueError unless packed, scales and zeros are the plane layout of an [N, k] weight
    in groups of group_size (16, 32, 64, 128 or a multiple of 128)."""
    if packed.dtype != torch.int32 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError("packed must be a contiguous int32 [N, K_padded / 8] plane layout")
    if packed.shape[1] != triton.cdiv(k, INT4_TILE) * INT4_TILE // 8:
        raise ValueError(
            f"packed {tuple(packed.shape)} does not cover K={k} in tiles of {INT4_TILE}"
        )
    if group_size < 16 or (
        group_size % INT4_PLANE if group_size > INT4_PLANE else INT4_PLANE % group_size
    ):
        raise ValueError(f"group_size {group_size} must divide 128 or be a multiple of it")
    n = packed.shape[0]
    groups = triton.cdiv(k, group_size)
    if scales.dim() != 2 or scales.shape[1] != n or scales.shape[0] < groups:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit {groups} groups of N={n}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
        raise ValueError(f"zeros must be uint8 of shape {tuple(scales.shape)}")


def _overrides(config: dict) -> tuple:
    names = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "use_dot")
    extra = ("fused_reduce", "scale_weights", "prefetch")
    unknown = set(config) - {*names, *extra}
    if unknown:
        raise TypeError(f"unknown launch parameters {sorted(unknown)}")
    return tuple(config.get(name) for name in (*names, *extra))


def _run(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_format: str,
    n: int,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
    num_groups: int,
    bias: torch.Tensor | None,
    overrides: tuple,
    x_qmax: float | None = None,
    row_absmax: torch.Tensor | None = None,
    x_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One launch for every weight format (the wrappers above checked the operands); 8-bit
    weights with x_qmax quantize x per token in the kernel (W8A8), by row_absmax when
    given; with x_scales, x holds rows quantized already (their code bytes) and the
    output is out_dtype."""
    dtype = out_dtype or x.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"skinny_matmul supports fp32, fp16 and bf16 x, not {dtype}")
    x_shape = x.shape
    k = x_shape[-1]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    # The usual 2-D x skips reshape and view (about a microsecond each).
    flat = len(x_shape) == 2
    m = x_shape[0] if flat else math.prod(x_shape[:-1])
    rows = x if flat else x.reshape(m, k)  # a view unless the leading dims cannot be merged
    out = torch.empty((m, n), dtype=dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        if k == 0:
            out.zero_()
            if bias is not None:
                out += bias
        return out if flat else out.view(*x_shape[:-1], n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()

    _read_shipped_configs_once(rows)
    if dtype == torch.float32 and weight_format != DENSE and overrides[4] is None:
        # fp32 rows (tests, references) are 4 bytes a value in shared memory: the
        # quantized configs' pipelines, sized for 16-bit rows, would not fit two stages more.
        overrides = (*overrides[:4], 2, *overrides[5:])
    plan = _plan(m, n, k, weight_format, group_size, *overrides, weight.element_size() * 8)
    workspace = out
    if plan.partial:
        workspace = torch.empty((plan.grid[1], m, n), dtype=torch.float32, device=out.device)
    counters = _tile_counters(x.device) if plan.fused_reduce else out
    _skinny_matmul_kernel[plan.grid](
        rows,
        x_scales if x_scales is not None else out,
        weight,
        scales if scales is not None else out,
        zeros if zeros is not None else out,
        row_absmax if row_absmax is not None else out,
        bias if bias is not None else out,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        num_groups,
        plan.k_per_split,
        rows.stride(0),
        weight.stride(0),
        m * n,
        n,
        float(x_qmax or 0.0),
        W_FORMAT=_FORMAT_IDS[weight_format],
        QUANT_X=x_qmax is not None and x_scales is None,
        X_CODES=x_scales is not None,
        GIVEN_ABSMAX=row_absmax is not None,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=plan.partial,
        FUSED_REDUCE=plan.fused_reduce,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        EVEN_K=plan.even_k,
        USE_DOT=plan.use_dot,
        IEEE=dtype == torch.float32,
        NUM_STAGES=plan.num_stages,
        SCALE_WEIGHTS=plan.scale_weights,
        PREFETCH_LINES=plan.prefetch_lines if PREFETCH or (plan.prefetch and _PTX) else 0,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **launch_options(out),
    )
    if plan.partial and not plan.fused_reduce:
        reduce_partials(workspace, bias, out)
    return out if flat else out.view(*x_shape[:-1], n)


def reduce_partials(workspace: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = the sum of the fp32 split-K partials workspace [splits, M, N] in split
    order (+ bias), rounded to out's dtype: the separate reduce launch."""
    splits, m, n = workspace.shape
    block = min(triton.next_power_of_2(n), 1024)
    _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
        workspace,
        bias if bias is not None else workspace,
        out,
        n,
        splits,
        m * n,
        n,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
        **launch_options(out),
    )


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that follows from the shapes and the config."""

    grid: tuple[int, int, int]
    k_per_split: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_dot: bool
    even_k: bool
    partial: bool
    fused_reduce: bool
    scale_weights: bool
    prefetch_lines: int
    prefetch: bool  # the config asks for the L2 prefetch (see SkinnyConfig.prefetch)


# Cached: this runs every eager decode step, and a Python-level cdiv costs microseconds.
@functools.lru_cache(maxsize=4096)
def _plan(
    m: int,
    n: int,
    k: int,
    weight_format: str,
    group_size: int,
    block_n: int | None,
    block_k: int | None,
    split_k: int | None,
    num_warps: int | None,
    num_stages: int | None,
    use_dot: bool | None,
    fused_reduce: bool | None,
    scale_weights: bool | None = None,
    prefetch: bool | None = None,
    weight_bits: int = 16,
) -> _Plan:
    config = choose_config(min(m, MAX_BLOCK_M), n, k, weight_format, group_size or 128)
    block_n = config.block_n if block_n is None else block_n
    block_k = config.block_k if block_k is None else block_k
    split_k = config.split_k if split_k is None else split_k
    use_dot = config.use_dot if use_dot is None else use_dot
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if use_dot and min(block_n, block_k) < DOT_BLOCK:
        raise ValueError(
            f"use_dot needs block_n and block_k >= {DOT_BLOCK}, got {block_n}, {block_k}"
        )
    if split_k < 1:
        raise ValueError(f"split_k must be at least 1, got {split_k}")
    # Whole tiles per split, so only the very last tile of K can be partial.
    k_tile = block_k
    if weight_format == INT4:
        if not use_dot:
            raise ValueError("int4 weights run the dot path only (use_dot=True)")
        plane_step = min(INT4_PLANE, group_size)
        if block_k // 4 < DOT_BLOCK or plane_step % (block_k // 4):
            raise ValueError(
                f"int4 block_k {block_k} must be 4 x a power of two from {DOT_BLOCK} to "
                f"{plane_step} (four planes, each within one group of {group_size})"
            )
        k_tile = INT4_TILE
    block_m = DOT_BLOCK if use_dot else min(triton.next_power_of_2(m), MAX_BLOCK_M)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), k_tile) * k_tile
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    partial = split_k > 1
    fused_reduce = config.fused_reduce if fused_reduce is None else fused_reduce
    return _Plan(
        grid=grid,
        k_per_split=k_per_split,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=config.num_warps if num_warps is None else num_warps,
        num_stages=config.num_stages if num_stages is None else num_stages,
        use_dot=use_dot,
        even_k=k % k_tile == 0,
        partial=partial,
        fused_reduce=partial and fused_reduce and grid[0] * grid[2] <= MAX_TILES,
        scale_weights=weight_format == INT4
        and (config.scale_weights if scale_weights is None else scale_weights),
        prefetch=bool(config.prefetch if prefetch is None else prefetch),
        prefetch_lines=_prefetch_lines(
            k,
            k_per_split,
            grid[1],
            4 if weight_format == INT4 else weight_bits,
            block_k,
            config.num_stages if num_stages is None else num_stages,
        ),
    )


def _prefetch_lines(
    k: int, k_per_split: int, splits: int, bits: int, block_k: int, num_stages: int
) -> int:
    """128-byte lines of each weight row a program asks L2 for before its wait: what its
    pipeline's first NUM_STAGES tiles read, at most its shortest split's share of the row
    (so never past a row), as a power of two; 0 below one line."""
    shortest = min(k_per_split, k - (splits - 1) * k_per_split)
    wanted = min(shortest, num_stages * block_k) * bits // 8 // _PREFETCH_LINE
    return 0 if wanted < 1 else 1 << (wanted.bit_length() - 1)


def _tile_counters(device: torch.device) -> torch.Tensor:
    """The device's arrival counters for fused split-K, all zero between launches (the
    last program of each tile resets its own). Allocated on first use, which must not be
    inside a CUDA graph capture: the buffer outlives every graph that uses it."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "skinny_matmul's split-K counters are allocated on the first split-K call, "
                "which must not be inside a CUDA graph capture: run one eager step first"
            )
        counters = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
