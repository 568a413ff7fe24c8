"""Triton attention over the paged KV cache: flash-decoding for one-token queries (with
cascade attention when a large batch shares a prefix) and a causal flash-attention
kernel for prefill and extend chunks (queries on top of a cached prefix). All read K/V
through the block table; the pure-torch oracle is ``reference.paged_attention``."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.pdl import launch_options, pdl_start

# KV tokens each program step reads; one decode program spans ceil(len/splits) tokens.
DECODE_BLOCK_N = 64
MAX_KV_SPLITS = 32
REDUCE_SPLIT_TILE = 8  # splits the reduction merges per step
# Cascade tiles: query rows (decode sequences x heads of a KV group) by prefix tokens.
CASCADE_BLOCK_M = 64
CASCADE_BLOCK_N = 64
CASCADE_NUM_WARPS = 4
LOG2_E = 1.4426950408889634  # kernels use exp2: scores are scaled into log2 units


# Masking modes of _attend_tiles.
MASK_NONE = tl.constexpr(0)  # every key of [first, last) is visible, whole tiles only
MASK_BOUNDS = tl.constexpr(1)  # every key of [first, last) is visible; last tile partial
MASK_CAUSAL = tl.constexpr(2)  # each row sees keys up to its position, within the window


# Under bf16 queries a float8 cache is widened to fp16, a single conversion per pair of
# values on Hopper (to bf16 it takes three), with the queries rounded to fp16 for the
# products: fp16 keeps more mantissa than bf16, and queries are clamped to its range.
FP8_VIA_FP16 = tl.constexpr(True)
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))
# Four e4m3 bytes to four fp16: two cvt.rn.f16x2.e4m3x2 (sm_89+), exact, as Triton's own.
_E4M3X4_TO_F16X4 = tl.constexpr(
    "{ .reg .b16 lo, hi;\n mov.b32 {lo, hi}, $2;\n"
    " cvt.rn.f16x2.e4m3x2 $0, lo;\n cvt.rn.f16x2.e4m3x2 $1, hi; }"
)


@triton.jit
def _widen_v(v, dtype):
    """A V tile in the queries' dtype. An fp8 tile is widened to fp16 where it was
    loaded, in rows of contiguous bytes, by an asm block Triton may not move (not pure):
    Triton would otherwise widen it after reading it from shared memory in the P @ V
    operand's layout, whose pairs run along the tokens, one byte load per value (128 a
    thread per 128-token tile; the asm block takes the loop from 1,481 to 815 SASS
    instructions, scripts/kernel_sass.py decode:256x1536x8)."""
    if not _INTERPRETED:  # noqa: SIM102
        if v.dtype == tl.float8e4nv:  # noqa: SIM102
            if dtype == tl.float16:
                return tl.inline_asm_elementwise(
                    _E4M3X4_TO_F16X4,
                    "=r,=r,r",
                    [v.to(tl.uint8, bitcast=True)],
                    dtype=tl.float16,
                    is_pure=False,
                    pack=4,
                )
    return v.to(dtype)


@triton.jit
def _compute_query(q, k_cache_ptr, FP8_AS_FP16: tl.constexpr):
    """The queries in the dtype the K/V tiles are widened to (``_attend_tiles`` widens
    them to the queries' dtype)."""
    # Nested: each test must stay a compile-time one (a chain of `and` is not).
    if FP8_AS_FP16:  # noqa: SIM102
        if k_cache_ptr.dtype.element_ty == tl.float8e4nv:  # noqa: SIM102
            if q.dtype == tl.bfloat16:
                q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _attend_tiles(
    q,
    m_i,
    l_i,
    acc,
    first,
    last,
    q_pos,
    table,
    k_cache_ptr,
    v_cache_ptr,
    kv_head,
    qk_scale,
    sliding_window,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    TABLE_AHEAD: tl.constexpr,
):
    """Online-softmax attention of the query tile over KV tokens [first, last), read
    through the block table. Scores are in log2 units (qk_scale includes log2(e)), so
    m_i and the log-sum-exp built from it are too. MASK picks the cheapest masking the
    caller's range allows (MASK_NONE, MASK_BOUNDS, MASK_CAUSAL).

    TABLE_AHEAD: each tile's block numbers are read one tile ahead, so its K/V loads
    depend on no load of their own step and Triton's pipeliner keeps num_stages - 1 K/V
    tiles in flight; loaded in the same step, they get one buffer whatever num_stages,
    and a program's loads wait for its math. More buffers cost shared memory, and so
    resident programs: faster for prefill and fp8 decode, slower for bf16 decode, and
    1-4 % slower for the cascade kernel (H200, kernels_attention.py:
    20261202-144125- against 20261202-143351-kernels-attention.json; see decode_launch)."""
    dims = tl.arange(0, HEAD_DIM)
    lane = tl.arange(0, BLOCK_N)
    if TABLE_AHEAD:
        head = first + lane
        next_blocks = tl.load(table + head // BLOCK_SIZE, mask=head < last, other=0)
    for start in range(first, last, BLOCK_N):
        tokens = start + lane
        valid = tokens < last
        if TABLE_AHEAD:
            blocks = next_blocks.to(tl.int64)
            ahead = tokens + BLOCK_N
            next_blocks = tl.load(table + ahead // BLOCK_SIZE, mask=ahead < last, other=0)
        else:
            blocks = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = (
            blocks * stride_cache_block
            + (tokens % BLOCK_SIZE) * stride_cache_tok
            + kv_head * stride_cache_head
        )
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        k = k.to(q.dtype)  # a float8 cache is widened to the queries' dtype
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * qk_scale
        if MASK == 1:
            scores = tl.where(valid[None, :], scores, float("-inf"))
        if MASK == 2:
            allowed = valid[None, :] & (tokens[None, :] <= q_pos[:, None])
            if sliding_window > 0:
                allowed = allowed & (tokens[None, :] > q_pos[:, None] - sliding_window)
            scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # Rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = _widen_v(v, q.dtype)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _own_slices(seq_len, sliding_window, prefix_len, num_splits, BLOCK_N: tl.constexpr):
    """Where a decode sequence's own keys start (after a window's cut or the cascade's
    shared prefix) and how many each of its num_splits slices takes (whole tiles; 0 for
    an empty sequence). The decode kernel and the reduction agree through this."""
    first = seq_len * 0  # a tensor, so both branches agree in type
    if sliding_window > 0:
        first = tl.maximum(seq_len - sliding_window, 0)
    if seq_len > prefix_len:
        first = tl.maximum(first, prefix_len)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    return first, per_split


@triton.jit
def _store_partial(
    part_out_ptr,
    part_lse_ptr,
    index,
    heads,
    slot,
    m_i,
    l_i,
    acc,
    mask,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    HEAD_DIM: tl.constexpr,
):
    """Write rows' normalized partial outputs and log2-sum-exp into split ``slot``. A
    row that saw no key gets -inf and no output: the reduction neither weighs nor reads
    it, so empty splits (short contexts, a cascade with nothing shared) cost no bytes."""
    dims = tl.arange(0, HEAD_DIM)
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = index.to(tl.int64) * stride_po_seq + heads * stride_po_head
    tl.store(
        part_out_ptr + row[:, None] + slot * stride_po_split + dims[None, :],
        out,
        mask=(mask & nonempty)[:, None],
    )
    tl.store(
        part_lse_ptr + index.to(tl.int64) * stride_pl_seq + heads * stride_pl_head + slot,
        lse,
        mask=mask,
    )


# Integer arguments that change from step to step are not specialized on (Triton would
# otherwise build a variant for each of ==1 / divisible by 16 / other, compiling inside
# some request's step): block-table widths, split counts and the strides they set.
_VARYING = ["stride_table", "num_splits", "stride_po_seq", "stride_po_head", "stride_pl_seq"]
_VARYING += ["stride_pl_head"]


@triton.jit(do_not_specialize=_VARYING)
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    prefix_len_ptr,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    qk_scale,
    sliding_window,
    stride_q_tok,
    stride_q_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_table,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    stride_out_tok,
    stride_out_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    CASCADE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    FP8_AS_FP16: tl.constexpr,
    TABLE_AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """Stage 1: one (sequence, KV head, split) attends its query heads over one slice
    of the context. With CASCADE, the shared prefix is left to the cascade kernel and
    the slices cover only the sequence's own suffix. With one split and no shared
    prefix the slice is the whole context: the program writes the final output itself
    and the reduction skips the sequence."""
    pdl_start(PDL)
    index = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_indices_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = tl.load(prefix_len_ptr) if CASCADE else seq_len * 0
    first, per_split = _own_slices(seq_len, sliding_window, prefix_len, num_splits, BLOCK_N)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    if not ONE_SPLIT and hi <= lo:
        return  # an empty slice: the reduction merges only the non-empty ones
    q_row = tl.load(query_start_ptr + seq)

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group
    head_mask = group < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + q_row.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )
    q = _compute_query(q, k_cache_ptr, FP8_AS_FP16)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i, l_i, acc = _attend_tiles(
        q,
        m_i,
        l_i,
        acc,
        lo,
        hi,
        group,  # no causal mask: every key of the slice precedes the query
        block_tables_ptr + seq.to(tl.int64) * stride_table,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        qk_scale,
        0,
        stride_cache_block,
        stride_cache_tok,
        stride_cache_head,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_SIZE,
        MASK_BOUNDS,
        IEEE_DOT,
        TABLE_AHEAD,
    )
    if ONE_SPLIT and prefix_len == 0:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key (padding): zeros
        target = out_ptr + q_row.to(tl.int64) * stride_out_tok + heads[:, None] * stride_out_head
        tl.store(target + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        _store_partial(
            part_out_ptr,
            part_lse_ptr,
            index,
            heads,
            split,
            m_i,
            l_i,
            acc,
            head_mask,
            stride_po_seq,
            stride_po_head,
            stride_po_split,
            stride_pl_seq,
            stride_pl_head,
            HEAD_DIM,
        )


@triton.jit(do_not_specialize=_VARYING + ["num_decode", "first_slot", "num_prefix_splits"])
def _cascade_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    prefix_len_ptr,
    part_out_ptr,
    part_lse_ptr,
    num_decode,
    first_slot,
    num_prefix_splits,
    qk_scale,
    stride_q_tok,
    stride_q_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_table,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    """Cascade attention's shared stage: the KV prefix every decode sequence shares is
    read once per (KV head, prefix slice) for a whole tile of query rows (sequence x
    head of the group), a matrix product instead of one KV read per sequence. Writes
    the partial into split slot first_slot + slice, after the per-sequence splits.
    With nothing shared it writes nothing: the reduction then reads only those."""
    pdl_start(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(prefix_len_ptr)
    if prefix_len == 0:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    index = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = index < num_decode
    seq = tl.load(seq_indices_ptr + index, mask=row_valid, other=0)
    seq_len = tl.load(seq_lens_ptr + seq, mask=row_valid, other=0)
    # CUDA-graph padding rows (seq_len 0) do not own the prefix.
    uses_prefix = row_valid & (seq_len > prefix_len)
    q_row = tl.load(query_start_ptr + seq, mask=row_valid, other=0).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=uses_prefix[:, None],
        other=0.0,
    )
    q = _compute_query(q, k_cache_ptr, FP8_VIA_FP16)
    per_split = tl.cdiv(tl.cdiv(prefix_len, num_prefix_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, prefix_len)
    # The prefix blocks are the same in every table; the first decode sequence's serves.
    first_seq = tl.load(seq_indices_ptr).to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i, l_i, acc = _attend_tiles(
        q,
        m_i,
        l_i,
        acc,
        lo,
        hi,
        rows,  # unused: no causal mask, the prefix precedes every query
        block_tables_ptr + first_seq * stride_table,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        qk_scale,
        0,
        stride_cache_block,
        stride_cache_tok,
        stride_cache_head,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_SIZE,
        MASK_BOUNDS,
        IEEE_DOT,
        False,
    )
    l_i = tl.where(uses_prefix, l_i, 0.0)
    _store_partial(
        part_out_ptr,
        part_lse_ptr,
        index,
        heads,
        first_slot + split,
        m_i,
        l_i,
        acc,
        row_valid,
        stride_po_seq,
        stride_po_head,
        stride_po_split,
        stride_pl_seq,
        stride_pl_head,
        HEAD_DIM,
    )


@triton.jit
def _merge_splits(lse_row, out_row, start, stop, m, total, acc, stride_po_split, dims, TILE):
    """Fold splits [start, stop) into the running (max, sum, weighted output), TILE at a
    time, by their log2-sum-exp."""
    for first in range(start, stop, TILE):
        splits = first + tl.arange(0, TILE)
        lse = tl.load(lse_row + splits, mask=splits < stop, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet
        alpha = tl.exp2(m - m_safe)
        weights = tl.exp2(lse - m_safe)
        parts = tl.load(
            out_row + splits[:, None] * stride_po_split + dims[None, :],
            mask=(lse > float("-inf"))[:, None],  # a row that saw no key wrote no output
            other=0.0,
        )
        acc = acc * alpha + tl.sum(parts * weights[:, None], 0)
        total = total * alpha + tl.sum(weights, 0)
        m = m_new
    return m, total, acc


@triton.jit(do_not_specialize=_VARYING + ["num_prefix_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    prefix_len_ptr,
    sliding_window,
    num_splits,
    num_prefix_splits,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    CASCADE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Stage 2: merge the splits of one (sequence, head): the sequence's own non-empty
    slices (a short context in a graph sized for long ones fills few of them), then the
    cascade's num_prefix_splits when a prefix is shared this step."""
    pdl_start(PDL)
    index = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(seq_indices_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = tl.load(prefix_len_ptr) if CASCADE else seq_len * 0
    if ONE_SPLIT and prefix_len == 0:
        return  # the decode program wrote this sequence's output
    first, per_split = _own_slices(seq_len, sliding_window, prefix_len, num_splits, BLOCK_N)
    own = tl.cdiv(seq_len - first, tl.maximum(per_split, 1))
    prefix_stop = num_splits + tl.where(prefix_len > 0, num_prefix_splits, 0)
    row = tl.load(query_start_ptr + seq)
    dims = tl.arange(0, HEAD_DIM)
    lse_row = part_lse_ptr + index * stride_pl_seq + head * stride_pl_head
    out_row = part_out_ptr + index * stride_po_seq + head * stride_po_head
    m = tl.full([], float("-inf"), dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    m, total, acc = _merge_splits(
        lse_row, out_row, 0, own, m, total, acc, stride_po_split, dims, SPLIT_TILE
    )
    m, total, acc = _merge_splits(
        lse_row, out_row, num_splits, prefix_stop, m, total, acc, stride_po_split, dims, SPLIT_TILE
    )
    out = acc / tl.where(total > 0, total, 1.0)  # an empty (padding) sequence: zeros
    target = out_ptr + row.to(tl.int64) * stride_out_tok + head * stride_out_head + dims
    tl.store(target, out.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["stride_table"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    qk_scale,
    sliding_window,
    stride_q_tok,
    stride_q_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_table,
    stride_out_tok,
    stride_out_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (sequence, query head, block of query rows): causal attention over the
    sequence's cached context, the rows' own new tokens included."""
    pdl_start(PDL)
    index = tl.program_id(0)
    head = tl.program_id(1)
    # Highest row blocks first: they see the most keys, so the long programs start early.
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)
    seq = tl.load(seq_indices_ptr + index)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_before = seq_len - q_len
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    q_pos = context_before + rows
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_offsets + dims[None, :], mask=row_valid[:, None], other=0.0)
    q = _compute_query(q, k_cache_ptr, FP8_VIA_FP16)
    kv_head = head // GROUP

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    hi = tl.minimum(seq_len, context_before + (m_block + 1) * BLOCK_M)
    first_row_pos = context_before + m_block * BLOCK_M
    # Keys before the tile's first row are visible to every row: whole tiles of them
    # run unmasked. A window starts each row's keys at its own place, so it masks all.
    if sliding_window > 0:
        lo = tl.maximum(first_row_pos - sliding_window + 1, 0)
        unmasked_end = lo
    else:
        lo = first_row_pos * 0  # a tensor, so both branches agree in type
        unmasked_end = (first_row_pos // BLOCK_N) * BLOCK_N
    m_i, l_i, acc = _attend_tiles(
        q,
        m_i,
        l_i,
        acc,
        lo,
        unmasked_end,
        q_pos,
        table,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        qk_scale,
        0,
        stride_cache_block,
        stride_cache_tok,
        stride_cache_head,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_SIZE,
        MASK_NONE,
        IEEE_DOT,
        True,
    )
    m_i, l_i, acc = _attend_tiles(
        q,
        m_i,
        l_i,
        acc,
        unmasked_end,
        hi,
        q_pos,
        table,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        qk_scale,
        sliding_window,
        stride_cache_block,
        stride_cache_tok,
        stride_cache_head,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_SIZE,
        MASK_CAUSAL,
        IEEE_DOT,
        True,
    )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_out_tok + head * stride_out_head
    tl.store(
        out_ptr + out_offsets + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


@functools.cache
def _num_multiprocessors() -> int:
    if not torch.cuda.is_available():
        return 132  # an H100; the interpreter has no device to ask
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Enough splits to give every multiprocessor about two programs, but no split
    shorter than two KV tiles."""
    wanted = triton.cdiv(2 * _num_multiprocessors(), max(1, num_seqs * num_kv_heads))
    longest_useful = max(1, triton.cdiv(max_seq_len, 2 * DECODE_BLOCK_N))
    return int(max(1, min(wanted, longest_useful, MAX_KV_SPLITS)))


def choose_num_prefix_splits(
    num_decode: int, group: int, num_kv_heads: int, prefix_len: int
) -> int:
    """Slices of the shared prefix for the cascade kernel: about two programs per
    multiprocessor over (row tiles x KV heads x slices), no slice under two KV tiles."""
    tiles = triton.cdiv(num_decode * group, CASCADE_BLOCK_M) * num_kv_heads
    wanted = triton.cdiv(2 * _num_multiprocessors(), tiles)
    longest_useful = max(1, triton.cdiv(prefix_len, 2 * CASCADE_BLOCK_N))
    return int(max(1, min(wanted, longest_useful, MAX_KV_SPLITS)))


def decode_launch(
    query_dtype: torch.dtype, cache_dtype: torch.dtype, fp8_as_fp16: bool
) -> tuple[int, int, int, bool]:
    """(BLOCK_N, warps, stages, TABLE_AHEAD) of the decode kernel; no register cap.

    A bf16/fp16 cache: 64-token tiles on 2 warps, three stages, each tile's block numbers
    read in its own step (one K/V buffer a program, more programs resident): the fastest
    or within 5 % of it at batch 32-256 x 512-4096 tokens, GQA 2 and 4 (H100,
    `kernels_attention.py --sweep-decode`); on the H200 89 % of DRAM peak
    (benchmarks/results/20261201-174500-ncu-decode-bf16.txt), and slower with the table
    read ahead (20261202-1440-decode-sweep-table-ahead.log).

    An fp8 cache widened to fp16: the same tiles and warps, the table read ahead (two K/V
    buffers a program). W4 with fp8 weights (H200, engine_workloads.py --workloads W4
    --kv-cache-dtype fp8 --quantization fp8): 14,431 and 14,554 output tok/s (15.85 and
    15.72 ms a steady step; 20261202-145550-W4.json, 20261202-151244-W4.json) against
    13,157 for the 128-token, 4-warp, 168-register setting it had (faf232b, widening V
    after a byte-wise shared-memory read; 20261202-145639-W4.json), and 13,789 and 14,250
    for 32-token tiles on one warp with three buffers (20261202-150511-W4.json,
    20261202-151332-W4.json), which alone at 256 x 1,500 tokens runs 0.221 ms against
    0.238 (20261202-1458-decode-fp8-probe.log): the engine's steps disagree with the
    kernel timed alone, and the engine's steps decide."""
    half = query_dtype in (torch.bfloat16, torch.float16)
    table_ahead = cache_dtype == torch.float8_e4m3fn and fp8_as_fp16 and half
    return DECODE_BLOCK_N, 2, 3, table_ahead


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fp8_as_fp16: bool = bool(FP8_VIA_FP16),
    max_registers: int | None = None,
    table_ahead: bool | None = None,
) -> None:
    """Attention of the one-token queries of ``metadata.decode_seq_indices`` into ``out``.
    The tile and launch settings are for benchmarks' sweeps; None picks the defaults
    (``decode_launch``)."""
    default_n, default_warps, default_stages, default_ahead = decode_launch(
        query.dtype, kv_cache.dtype, fp8_as_fp16
    )
    if block_n is None or num_warps is None:
        block_n, num_warps = default_n, default_warps
    num_stages = default_stages if num_stages is None else num_stages
    table_ahead = default_ahead if table_ahead is None else table_ahead
    num_decode = metadata.num_decode
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    splits = metadata.num_kv_splits or choose_num_kv_splits(
        num_decode, num_kv_heads, metadata.max_seq_len
    )
    # A window would cut into the prefix differently per sequence: no cascade there.
    cascade = metadata.shared_prefix_len_cpu > 0 and not sliding_window
    prefix_splits = (
        choose_num_prefix_splits(num_decode, group, num_kv_heads, metadata.shared_prefix_len_cpu)
        if cascade
        else 0
    )
    part_out = torch.empty(
        (num_decode, num_heads, splits + prefix_splits, head_dim),
        dtype=torch.float32,
        device=query.device,
    )
    part_lse = torch.empty(
        (num_decode, num_heads, splits + prefix_splits), dtype=torch.float32, device=query.device
    )
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    ieee = query.dtype == torch.float32
    qk_scale = scale * LOG2_E
    # Any int32 tensor stands in for the prefix length when there is no cascade.
    prefix_len = metadata.shared_prefix_len if cascade else metadata.seq_lens
    common = (
        query,
        k_cache,
        v_cache,
        metadata.block_tables,
        metadata.seq_lens,
        metadata.decode_seq_indices,
        metadata.query_start_loc,
        prefix_len,
        part_out,
        part_lse,
    )
    strides = (
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        metadata.block_tables.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
    )
    _decode_partial_kernel[(num_decode, num_kv_heads, splits)](
        *common,
        out,
        splits,
        qk_scale,
        sliding_window or 0,
        *strides,
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        ONE_SPLIT=splits == 1,
        CASCADE=cascade,
        IEEE_DOT=ieee,
        FP8_AS_FP16=fp8_as_fp16,
        TABLE_AHEAD=table_ahead,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(query),
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    if cascade:
        row_tiles = triton.cdiv(num_decode * group, CASCADE_BLOCK_M)
        _cascade_prefix_kernel[(row_tiles, num_kv_heads, prefix_splits)](
            *common,
            num_decode,
            splits,
            prefix_splits,
            qk_scale,
            *strides,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_M=CASCADE_BLOCK_M,
            BLOCK_N=CASCADE_BLOCK_N,
            BLOCK_SIZE=block_size,
            IEEE_DOT=ieee,
            num_warps=CASCADE_NUM_WARPS,
            num_stages=2,
            **launch_options(query),
        )
    elif splits == 1:
        return  # the decode kernel wrote the output
    _decode_reduce_kernel[(num_decode, num_heads)](
        part_out,
        part_lse,
        out,
        metadata.seq_lens,
        metadata.decode_seq_indices,
        metadata.query_start_loc,
        prefix_len,
        sliding_window or 0,
        splits,
        prefix_splits,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        SPLIT_TILE=REDUCE_SPLIT_TILE,
        ONE_SPLIT=splits == 1,
        CASCADE=cascade,
        num_warps=4,
        **launch_options(query),
    )


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
) -> None:
    """Causal attention of the batch's multi-token chunks over the paged cache."""
    seq_indices = metadata.prefill_seq_indices
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (seq_indices.shape[0], num_heads, triton.cdiv(metadata.max_query_len, block_m))
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        metadata.block_tables,
        metadata.seq_lens,
        seq_indices,
        metadata.query_start_loc,
        scale * LOG2_E,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        metadata.block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        IEEE_DOT=query.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(query),
    )


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``reference.paged_attention``; decodes and chunks in two launches."""
    if out is None:
        out = torch.empty_like(query)
    if metadata.num_decode:
        decode_attention(query, kv_cache, metadata, scale, sliding_window, out)
    if metadata.num_prefill:
        prefill_attention(query, kv_cache, metadata, scale, sliding_window, out)
    return out
