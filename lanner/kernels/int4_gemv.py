"""Triton int4 W4A16 GEMV for decode rows: ``x @ W.T`` with W in lanner's int4 plane layout,
streamed straight from global memory into registers and multiplied on the CUDA cores (no
tensor cores, no shared-memory staging, no padded activation).

Why not skinny_matmul's int4 path for a single row: that one copies [BLOCK_N, BLOCK_K / 4]
word tiles into shared memory through a cp.async pipeline and multiplies each of their four
planes by x padded to 16 rows with tl.dot; the padded x tile takes half the shared memory
a stage has, so few stages and programs fit an SM and the H200 sweep put it at 0.26-0.50 of
the copy bandwidth (benchmarks/results/20261201-154700-tune-quant.log).

Here each program owns BLOCK_N weight rows and one K range of them (split-K). A step loads
[BLOCK_N, BLOCK_I] packed int32s, 4 consecutive ones (16 bytes, a "chunk") a thread of each
row, the warp's threads side by side along K (whole 32-byte sectors); BLOCK_I = 4 x 32 x
num_warps, so one load covers the step. In the plane layout (kernels/quant_reference.py)
int32 i of a row holds words 2i and 2i + 1 of its 512-code tile, and nibble plane s of
word p the code of k = 512 tile + 128 s + p: a chunk holds, per plane, the codes of 8
consecutive k of one group. Per code one LOP3 (PTX), after a shift (shared by two planes
with 16-bit x), puts q into the mantissa of the fp32 16.0 or 256.0, giving c + q exactly,
no int-to-float convert; one FMA multiplies it by x (fp32); a chunk's 8 products are
summed in the thread's registers, and (c + zero) times the chunk's x sum is taken off
before the group scale multiplies it into the fp32 accumulator. The accumulators are
summed across threads once, after the loop. The x values (and the scales) are read in the
words' layout, every operand shaped [rows of x, rows of W, chunks, ...] from the start, so
Triton converts no layout.

Cost (scripts/kernel_sass.py, sm_90): about 3.7 SASS instructions a code at one row with
16-bit x (4.4 before the shared shifts and the scales' 16-byte loads), against the ~4 that
the H200's issue rate allows at copy bandwidth (4.2 TB/s over 132 SMs at ~1.9 GHz: ~32
codes a clock per SM): the instruction count bounds it (Nsight Compute, W1's gate_up: issue
slots busy 58 % of cycles, benchmarks/results/20261202-0455-ncu-int4-gemv-gate_up.txt),
and the loads must overlap the math: across the programs an SM holds, and (prefetch) by
loading each next step's words into registers before this step's math, or (num_stages >
1) through Triton's cp.async pipeline. Each extra row of x adds about one FMA a code (2
rows: ~5.9 a code at 5ba2818), which is why 2-16 rows keep the tile path unless a measured
table says otherwise.

The layout needs nothing new at load: the plane layout every int4 checkpoint format is
repacked into (AWQ, GPTQ, compressed-tensors pack-quantized) already keeps each row's words
contiguous along K.

Rounding: (c + q) x is exact in fp32 only up to one rounding of the product (|x| 31 2^-24
at most with c = 16, |x| 271 2^-24 with c = 256, 16-bit x only), and taking (c + zero)
sum x off a chunk's sum loses about as much again: with bf16 and fp16 outputs far below
their own rounding, with fp32 ones (fp32 x: c = 16) within ~2^-19 of the outputs' scale
(tests/kernels/test_int4_gemv.py bounds it). Rows are independent (each output row is its
own x row times the same words in the same order), so row i of an M-row call does not
depend on the others.

Split-K: as skinny_matmul (fp32 partials, the last program of a tile adds them in split
order, deterministic; CUDA-graph capturable once a split-K call ran outside a capture).
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
from lanner.kernels.skinny_matmul import MAX_TILES, _tile_counters, split_k_epilogue

# int32s (16 bytes, the widest load) a thread loads at once: per plane, 8 consecutive k
# of one group.
VEC = 4
# Rows of x one program multiplies (more rows launch more program rows, each re-reading W).
MAX_GEMV_ROWS = 16
_VEC = tl.constexpr(VEC)
_PLANE = tl.constexpr(INT4_PLANE)
_TILE = tl.constexpr(INT4_TILE)
_INTS_A_TILE = tl.constexpr(INT4_TILE // 8)
# fp32 bits: 16.0, and the mantissa bits that count ones in [16, 32) (kernels read
# 16 + q there, then take the offset and the zero point off each chunk's sum).
_SIXTEEN = tl.constexpr(0x41800000)
_CODE_BITS = tl.constexpr(0x00780000)
# With 16-bit x (SHARED_SHIFTS), planes 0 and 2 read 256 + q instead: the fp32 256.0, and
# the mantissa bits that count ones in [256, 512) (see _plane_values).
_TWO_FIFTY_SIX = tl.constexpr(0x43800000)
_LOW_CODE_BITS = tl.constexpr(0x00078000)
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GemvPlan:
    """What a launch derives from the shapes and its parameters."""

    grid: tuple[int, int, int]
    ints_per_split: int
    block_m: int
    block_n: int
    block_i: int
    num_warps: int
    num_stages: int
    even: bool
    partial: bool
    fused_reduce: bool


@functools.lru_cache(maxsize=4096)
def gemv_plan(
    m: int,
    n: int,
    k: int,
    row_ints: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    fused_reduce: bool = True,
) -> GemvPlan:
    """The launch of an [m, k] x [n, k] int4 GEMV whose packed rows hold row_ints int32s;
    block_k counts the codes of a step (block_k / 8 int32s of each row)."""
    for name, value in (("block_n", block_n), ("block_k", block_k), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    block_i = block_k // 8
    if block_i < VEC * 32 * num_warps:
        # Below that the x tile gets a layout of its own, converted every step (2x slower).
        raise ValueError(
            f"int4 GEMV block_k must be at least {8 * VEC * 32} x num_warps ({num_warps}): "
            f"one 16-byte load a thread covers a step; got {block_k}"
        )
    if split_k < 1:
        raise ValueError(f"split_k must be at least 1, got {split_k}")
    ints_per_split = triton.cdiv(triton.cdiv(row_ints, split_k), block_i) * block_i
    splits = triton.cdiv(row_ints, ints_per_split)
    block_m = min(triton.next_power_of_2(max(m, 1)), MAX_GEMV_ROWS)
    grid = (triton.cdiv(n, block_n), splits, triton.cdiv(m, block_m))
    partial = splits > 1
    return GemvPlan(
        grid=grid,
        ints_per_split=ints_per_split,
        block_m=block_m,
        block_n=block_n,
        block_i=block_i,
        num_warps=num_warps,
        num_stages=num_stages,
        even=k == row_ints * 8 and row_ints % block_i == 0,
        partial=partial,
        fused_reduce=partial and fused_reduce and grid[0] * grid[2] <= MAX_TILES,
    )


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 1,
    fused_reduce: bool = True,
    prefetch: bool = False,
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for int4 W in the plane layout (operands as
    skinny_matmul_w4 takes them, checked there), fp32 sums, output in x's dtype.
    num_stages > 1 stages the words through shared memory (Triton's cp.async pipeline);
    prefetch loads each next step's words into registers instead."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"int4_gemv supports fp32, fp16 and bf16 x, not {x.dtype}")
    k = x.shape[-1]
    n = packed.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    m = math.prod(x.shape[:-1])
    rows = x.reshape(m, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        if k == 0:
            out.zero_()
            if bias is not None:
                out += bias
        return out.view(*x.shape[:-1], n)
    plan = gemv_plan(
        m, n, k, packed.shape[1], block_n, block_k, split_k, num_warps, num_stages, fused_reduce
    )
    workspace = out
    if plan.partial:
        workspace = torch.empty((plan.grid[1], m, n), dtype=torch.float32, device=x.device)
    counters = _tile_counters(x.device) if plan.fused_reduce else out
    _int4_gemv_kernel[plan.grid](
        rows,
        packed,
        scales,
        zeros if zeros is not None else out,
        bias if bias is not None else out,
        out,
        workspace,
        counters,
        m,
        n,
        k,
        scales.shape[0],
        packed.shape[1],
        plan.ints_per_split,
        rows.stride(0),
        packed.stride(0),
        m * n,
        n,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=plan.partial,
        FUSED_REDUCE=plan.fused_reduce,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_I=plan.block_i,
        EVEN=plan.even,
        EVEN_N=n % plan.block_n == 0,
        NUM_STAGES=plan.num_stages,
        PREFETCH=prefetch,
        SHARED_SHIFTS=x.dtype != torch.float32,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **launch_options(out),
    )
    if plan.partial and not plan.fused_reduce:
        # (the separate reduce of skinny_matmul: imported here, it is its private kernel)
        from lanner.kernels.skinny_matmul import reduce_partials

        reduce_partials(workspace, bias, out)
    return out.view(*x.shape[:-1], n)


# M is not specialized on, nor the split stride M * N (see skinny_matmul).
@triton.jit(do_not_specialize=["M", "partial_stride_split"])
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    num_groups,
    row_ints,
    ints_per_split,
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
    BLOCK_I: tl.constexpr,
    EVEN: tl.constexpr,
    EVEN_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PREFETCH: tl.constexpr,
    SHARED_SHIFTS: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid: (N blocks, K splits, M blocks); neighbouring programs read neighbouring rows.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    CHUNKS: tl.constexpr = BLOCK_I // _VEC
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read a copy of the last row (never stored): no row mask on the loads.
    rows_in = tl.minimum(rows_n, N - 1)
    w_rows = w_ptr + rows_in.to(tl.int64) * w_stride_row

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_row_mask = rows_m < M
    x_rows = x_ptr + rows_m.to(tl.int64) * x_stride_row
    ints = tl.arange(0, BLOCK_I)
    chunk = tl.arange(0, CHUNKS)
    in_chunk = tl.arange(0, 2 * _VEC)
    # Operands shaped [rows of x, rows of W, chunks (, k of a chunk)] from the start, x
    # broadcast along the rows of W: a thread loads a chunk, 4 int32s (16 bytes) of each
    # of its rows and the chunk's 8 x values (16 bytes) in each plane, so with BLOCK_I
    # = 4 x 32 x num_warps (one load covers the step) the words, x and the products
    # share one layout, and a chunk's sum stays in the thread's registers.
    w_ptrs = w_rows[None, :, None] + ints[None, None, :]
    # x is read [1, CHUNKS, BLOCK_M, 8] and permuted (as the scales below): with the
    # rows of x after the chunks, the load's layout puts the threads along the chunks and
    # the rows of x in registers, as the words' layout has them.
    x_ptrs = x_rows[None, None, :, None] + in_chunk[None, None, None, :]
    x_mask = x_row_mask[None, None, :, None]
    # The scales and zero points are read [1, CHUNKS, BLOCK_N] and permuted, so the tile
    # lands in the sums' layout, no conversion: a thread holds a chunk's BLOCK_N rows.
    # Where N is a multiple of BLOCK_N the rows are read unclamped, contiguous: one
    # 16-byte load a plane for 8 bf16 scales (8 two-byte loads and their addresses
    # otherwise: ~85 SASS instructions fewer a step at W1's gate_up).
    param_rows = rows_n if EVEN_N else rows_in
    scale_rows = scale_ptr + param_rows[None, None, :]
    zero_rows = zero_ptr + param_rows[None, None, :]
    int_start = pid_k * ints_per_split
    int_stop = tl.minimum(int_start + ints_per_split, row_ints)
    acc = tl.zeros((BLOCK_M, BLOCK_N, CHUNKS), dtype=tl.float32)
    if PREFETCH:
        # Before the wait for the kernel ahead (no kernel writes weights): the first
        # step's words come in while that kernel ends.
        words_next = _load_words(w_ptrs, ints, int_start, int_stop, EVEN)
    pdl_start(PDL)
    for i0 in tl.range(int_start, int_stop, BLOCK_I, num_stages=NUM_STAGES):
        if PREFETCH:
            # The next step's words are loaded into registers before this step's math, so
            # a warp's loads stay in flight while it computes (the last step's next load
            # is masked off: no traffic).
            words = words_next
            words_next = _load_words(w_ptrs, ints, i0 + BLOCK_I, int_stop, False)
        else:
            words = _load_words(w_ptrs, ints, i0, int_stop, EVEN)
        # int32 i holds words 2i and 2i + 1 of its tile (i // 64), so a chunk of 4 from
        # int32 c holds, in plane 0, the codes of k = 512 (c // 64) + 2 (c % 64) and the
        # 7 after it.
        first = (i0 + chunk * _VEC).to(tl.uint32)  # (unsigned: shifts, not divisions)
        chunk_k = (first // _INTS_A_TILE) * _TILE + 2 * (first % _INTS_A_TILE)
        for plane in tl.static_range(4):
            k_first = chunk_k + plane * _PLANE
            group = tl.minimum((k_first // GROUP).to(tl.int32), num_groups - 1)
            group = group[None, :, None] * N
            scale = tl.permute(tl.load(scale_rows + group), (0, 2, 1)).to(tl.float32)
            x_ks = k_first.to(tl.int32)[None, :, None, None]
            if EVEN:
                x = tl.load(x_ptrs + x_ks, mask=x_mask, other=0.0)
            else:
                x_in = x_mask & (x_ks + in_chunk[None, None, None, :] < K)
                x = tl.load(x_ptrs + x_ks, mask=x_in, other=0.0)
            x = tl.permute(x, (2, 0, 1, 3)).to(tl.float32)
            low, high = _plane_values(words, plane, SHARED_SHIFTS)
            w = tl.reshape(tl.join(low, high), (1, BLOCK_N, CHUNKS, 2 * _VEC))
            sums = tl.sum(x * w, axis=3)
            # sum (c + q) x - (c + zero) sum x = sum (q - zero) x, times the group scale.
            offset = 256.0 if SHARED_SHIFTS and plane % 2 == 0 else 16.0
            if HAS_ZEROS:
                zero = tl.permute(tl.load(zero_rows + group), (0, 2, 1)).to(tl.float32)
                acc += (sums - (zero + offset) * tl.sum(x, axis=3)) * scale
            else:
                acc += (sums - tl.sum(x, axis=3) * (offset + _SYMMETRIC_ZERO)) * scale
    split_k_epilogue(
        tl.sum(acc, axis=2),
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


def _lop3_asm(mask: int, magic: int) -> str:
    """PTX of (a & mask) | magic for two registers in one LOP3 each (the compiler's own
    and + or takes two, both immediates not fitting one)."""
    return (
        f"lop3.b32 $0, $2, {mask:#010x}, {magic:#010x}, 0xea;\n"
        f"lop3.b32 $1, $3, {mask:#010x}, {magic:#010x}, 0xea;"
    )


_LOP3_SIXTEEN = tl.constexpr(_lop3_asm(_CODE_BITS.value, _SIXTEEN.value))
_LOP3_TWO_FIFTY_SIX = tl.constexpr(_lop3_asm(_LOW_CODE_BITS.value, _TWO_FIFTY_SIX.value))
_SYMMETRIC_ZERO = tl.constexpr(float(INT4_SYMMETRIC_ZERO))


@triton.jit
def _load_words(w_ptrs, ints, i0, int_stop, EVEN: tl.constexpr):
    """The packed int32s [.., BLOCK_I] of the step at i0 (those from int_stop on read 0)."""
    if EVEN:
        words = tl.load(w_ptrs + i0)
    else:
        words = tl.load(w_ptrs + i0, mask=(i0 + ints < int_stop)[None, None, :], other=0)
    return words


@triton.jit
def _plane_values(words, PLANE: tl.constexpr, SHARED_SHIFTS: tl.constexpr):
    """c + q for the codes q of nibble plane PLANE of each int32's low and high 16-bit
    word, as fp32, exactly: q moved into the mantissa steps of 1 under the exponent of c,
    no int-to-float convert, one LOP3 a code (PTX; the interpreter runs the same bit
    operations in Triton) after a shift.

    c = 16 (q at bits 19..22): one shift a code. With SHARED_SHIFTS one shift serves two
    planes: w << 15 puts plane 0's low-word code at bits 15..18 and plane 1's at 19..22,
    w >> 1 the high-word ones, w << 7 and w >> 9 planes 2 and 3's; at bits 15..18 c is 256.
    Half the shifts, for a product x (256 + q) that rounds at 2^-24 of |x| 271: far below
    a 16-bit output's rounding, so fp32 x keeps c = 16 (assert_close's bound)."""
    if SHARED_SHIFTS:
        low_src = words << (15 - 8 * (PLANE // 2))
        high_src = words >> (1 + 8 * (PLANE // 2))
    elif PLANE == 0:
        low_src = words << 19
        high_src = words << 3
    else:
        low_src = words << (19 - 4 * PLANE)
        high_src = words >> (4 * PLANE - 3)
    if _INTERPRETED:
        if SHARED_SHIFTS and PLANE % 2 == 0:
            mask, magic = _LOW_CODE_BITS, _TWO_FIFTY_SIX
        else:
            mask, magic = _CODE_BITS, _SIXTEEN
        low = ((low_src & mask) | magic).to(tl.float32, bitcast=True)
        high = ((high_src & mask) | magic).to(tl.float32, bitcast=True)
    else:
        if SHARED_SHIFTS and PLANE % 2 == 0:
            asm: tl.constexpr = _LOP3_TWO_FIFTY_SIX
        else:
            asm: tl.constexpr = _LOP3_SIXTEEN
        low, high = tl.inline_asm_elementwise(
            asm,
            "=r,=r,r,r",
            [low_src, high_src],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    return low, high
