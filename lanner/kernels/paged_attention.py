"""Triton attention over the paged KV cache: flash-decoding for one-token queries and a
causal flash-attention kernel for prefill and extend chunks (queries on top of a cached
prefix). Both read K/V through the block table; the pure-torch oracle is
``reference.paged_attention``."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lanner.kernels.attention_metadata import AttentionMetadata

# KV tokens each program step reads; one decode program spans ceil(len/splits) tokens.
DECODE_BLOCK_N = 64
MAX_KV_SPLITS = 32


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
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
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Stage 1: one (sequence, KV head, split) attends its query heads over one slice
    of the context; writes the slice's normalized output and log-sum-exp."""
    index = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_indices_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
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
    first = seq_len * 0  # a tensor, so both branches agree in type
    if sliding_window > 0:
        first = tl.maximum(seq_len - sliding_window, 0)
    span = seq_len - first
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    for start in range(lo, hi, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < hi
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = (
            blocks * stride_cache_block
            + (tokens % BLOCK_SIZE) * stride_cache_tok
            + kv_head * stride_cache_head
        )
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    po = part_out_ptr + index * stride_po_seq + heads[:, None] * stride_po_head
    tl.store(po + split * stride_po_split + dims[None, :], out, mask=head_mask[:, None])
    pl = part_lse_ptr + index * stride_pl_seq + heads * stride_pl_head + split
    tl.store(pl, lse, mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq_indices_ptr,
    query_start_ptr,
    stride_po_seq,
    stride_po_head,
    stride_po_split,
    stride_pl_seq,
    stride_pl_head,
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Stage 2: merge the splits of one (sequence, head) by their log-sum-exp."""
    index = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(seq_indices_ptr + index)
    row = tl.load(query_start_ptr + seq)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(
        part_lse_ptr + index * stride_pl_seq + head * stride_pl_head + splits,
        mask=splits < NUM_SPLITS,
        other=float("-inf"),
    )
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty (padding) sequence
    weights = tl.exp(lse - m)
    parts = tl.load(
        part_out_ptr
        + index * stride_po_seq
        + head * stride_po_head
        + splits[:, None] * stride_po_split
        + dims[None, :],
        mask=(splits < NUM_SPLITS)[:, None],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    target = out_ptr + row.to(tl.int64) * stride_out_tok + head * stride_out_head + dims
    tl.store(target, out.to(out_ptr.dtype.element_ty))


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
    MASKED: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Online-softmax attention of the query tile over KV tokens [first, last).
    MASKED applies causality and the sliding window; unmasked tiles lie wholly in
    every row's past, so they skip the mask arithmetic."""
    dims = tl.arange(0, HEAD_DIM)
    for start in range(first, last, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < last
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offsets = (
            blocks * stride_cache_block
            + (tokens % BLOCK_SIZE) * stride_cache_tok
            + kv_head * stride_cache_head
        )
        k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * qk_scale  # in log2 units: exp2 below
        if MASKED:
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
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_indices_ptr,
    query_start_ptr,
    scale,
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
):
    """One (sequence, query head, block of query rows): causal attention over the
    sequence's cached context, the rows' own new tokens included."""
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
    kv_head = head // GROUP
    qk_scale = scale * 1.4426950408889634  # log2(e)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    hi = tl.minimum(seq_len, context_before + (m_block + 1) * BLOCK_M)
    first_row_pos = context_before + m_block * BLOCK_M
    if sliding_window > 0:
        lo = tl.maximum(first_row_pos - sliding_window + 1, 0)
        m_i, l_i, acc = _attend_tiles(
            q,
            m_i,
            l_i,
            acc,
            lo,
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
            True,
            IEEE_DOT,
        )
    else:
        # Keys before the tile's first row are visible to every row: no mask needed.
        unmasked_end = (first_row_pos // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _attend_tiles(
            q,
            m_i,
            l_i,
            acc,
            0,
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
            False,
            IEEE_DOT,
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
            0,
            stride_cache_block,
            stride_cache_tok,
            stride_cache_head,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_SIZE,
            True,
            IEEE_DOT,
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


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """Attention of the one-token queries of ``metadata.decode_seq_indices`` into ``out``."""
    num_decode = metadata.num_decode
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    splits = metadata.num_kv_splits or choose_num_kv_splits(
        num_decode, num_kv_heads, metadata.max_seq_len
    )
    part_out = torch.empty(
        (num_decode, num_heads, splits, head_dim), dtype=torch.float32, device=query.device
    )
    part_lse = torch.empty(
        (num_decode, num_heads, splits), dtype=torch.float32, device=query.device
    )
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    ieee = query.dtype == torch.float32
    _decode_partial_kernel[(num_decode, num_kv_heads, splits)](
        query,
        k_cache,
        v_cache,
        metadata.block_tables,
        metadata.seq_lens,
        metadata.decode_seq_indices,
        metadata.query_start_loc,
        part_out,
        part_lse,
        scale,
        sliding_window or 0,
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
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=DECODE_BLOCK_N,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=splits,
        IEEE_DOT=ieee,
        num_warps=4,
        num_stages=2,
    )
    _decode_reduce_kernel[(num_decode, num_heads)](
        part_out,
        part_lse,
        out,
        metadata.decode_seq_indices,
        metadata.query_start_loc,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        NUM_SPLITS=splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
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
        scale,
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
