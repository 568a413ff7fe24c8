"""Paged attention on the CPU with batched torch ops: rotary and the K/V write into the
paged cache (``qkv_prepare``), then attention over it (``paged_attention``). The CPU
engine runs these; ``reference.py`` stays the test oracle they are checked against.

Decodes (one query each) run as one batch: every sequence's blocks are gathered into
one padded [B, kv_heads, S, head_dim] tensor and the whole batch goes through one
``scaled_dot_product_attention`` call, the g query heads sharing a KV head standing in
for its query length (so grouped-query attention needs no repeated K/V). Prefill and
extend chunks each go through one SDPA call over their gathered context, causal when
nothing is cached before the chunk, with an explicit mask otherwise. What a step's
layers share (gather indices, masks) is built once, by the first layer, and kept on
the step's metadata.

A decode batch that continues the last step (only decodes, one row per sequence, the
same sequences in the same order, each one token longer, on the same blocks) does not
gather its context again: each layer keeps its decode batch's K/V laid out per
sequence on its cache tensor (``_DenseKV``, with room for DENSE_HEADROOM more tokens)
and appends the step's new rows to it. This assumes what the engine does: between two
consecutive steps a layer's paged cache changes only by the new tokens qkv_prepare
writes; any other step (a prefill, a new or finished sequence, a preemption, a verify
step's rows of one sequence, another model's step) rebuilds the copy from the paged
cache, as does a copy that would outgrow DENSE_MAX_BYTES.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.reference import rms_norm, to_cache_dtype

# Tokens of room a rebuilt dense copy leaves each sequence, so that appends run that
# many steps before the next rebuild.
DENSE_HEADROOM = 64
# Above this a layer's dense copy is not kept (a long-context batch gathers each step).
DENSE_MAX_BYTES = 64 << 20


def qkv_prepare(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``ops.qkv_prepare`` on the CPU: the reference's arithmetic, operation for operation
    (the same bits), in fewer torch calls, which is what a small model's step costs here.
    A row whose slot is -1 is not stored, as in the reference."""
    if q_norm_weight is not None and k_norm_weight is not None:
        query = rms_norm(query, q_norm_weight, eps)
        key = rms_norm(key, k_norm_weight, eps)
    cos_full, sin_signed = _rotary_tables(positions, cos_sin_cache)
    joint = _side_by_side(query, key)
    if joint is not None:
        # q and k are neighbours in one projection output: one rotation for both.
        rotated = _rotate(joint, cos_full, sin_signed)
        query, key = rotated[:, : query.shape[1]], rotated[:, query.shape[1] :]
    else:
        query = _rotate(query, cos_full, sin_signed)
        key = _rotate(key, cos_full, sin_signed)
    num_kv_heads, head_dim = cache.shape[-2:]
    # index_copy_ has no float8 kernel: an fp8 cache is written as its bytes.
    as_stored = torch.uint8 if cache.element_size() == 1 else cache.dtype
    slots = cache.view(as_stored).view(2, -1, num_kv_heads, head_dim)
    if _has_padding_slots(slot_mapping):
        # Rows with slot -1 store nothing (a draft head's padding rows).
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    for index, new in enumerate((key, value)):
        slots[index].index_copy_(0, slot_mapping, to_cache_dtype(new, cache.dtype).view(as_stored))
    return query


def _side_by_side(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """[T, heads + kv_heads, d]: query and key as one view, when key's heads follow
    query's in memory with the same row stride (the split of one qkv output); else None.
    (A single row's stride is whatever its view says: a decode row of q and of k report
    different ones, so only more rows compare it.)"""
    if (
        query.dim() != 3
        or query.dtype != key.dtype
        or query.shape[0] != key.shape[0]
        or query.shape[2] != key.shape[2]
        or query.stride()[1:] != (query.shape[2], 1)
        or key.stride()[1:] != (query.shape[2], 1)
        or (query.shape[0] > 1 and key.stride(0) != query.stride(0))
        or key.data_ptr() != query.data_ptr() + query[0].numel() * query.element_size()
    ):
        return None
    heads = query.shape[1] + key.shape[1]
    return query.as_strided((query.shape[0], heads, query.shape[2]), query.stride())


# The last step's slot mapping and whether it has padding rows (-1): every layer of a
# step passes the same tensor; asked once, not once a layer (a host sync each).
_last_slots: tuple[torch.Tensor, bool] | None = None


def _has_padding_slots(slot_mapping: torch.Tensor) -> bool:
    global _last_slots
    if _last_slots is not None and _last_slots[0] is slot_mapping:
        return _last_slots[1]
    padded = bool(slot_mapping.numel()) and int(slot_mapping.min()) < 0
    _last_slots = (slot_mapping, padded)
    return padded


# The last step's rotary tables: every layer of a step passes the same positions tensor.
_last_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _rotary_tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, head_dim] cos | cos and -sin | sin at each token's position, so x rotates
    as x * cos + roll(x, half) * sin: (x1 cos - x2 sin, x2 cos + x1 sin), HF's
    rotate-half. Built once a step: the runner makes a new positions tensor for every
    step and passes it to every layer, so the tables are kept for that tensor (held, so
    its identity cannot pass to another while compared)."""
    global _last_tables
    last = _last_tables
    if last is not None and last[0] is positions and last[1] is cos_sin_cache:
        return last[2], last[3]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    cos_full = torch.cat((cos, cos), dim=-1)
    sin_signed = torch.cat((-sin, sin), dim=-1)
    _last_tables = (positions, cos_sin_cache, cos_full, sin_signed)
    return cos_full, sin_signed


def _rotate(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    rotated = x32 * cos_full + x32.roll(x.shape[-1] // 2, dims=-1) * sin_signed
    return rotated.to(x.dtype)


@dataclass
class _DecodeBatch:
    """The step's one-token queries: rows of the flat batch, and their padded context."""

    rows: torch.Tensor  # [B] int64: query row of each decode sequence
    block_ids: torch.Tensor  # [B * blocks] int64: block tables padded to the longest, flat
    seq_lens: torch.Tensor  # [B] int64
    num_blocks: int  # blocks per sequence after padding
    tables: torch.Tensor  # [B, num_blocks] int64: the block tables, padded
    max_seq_len: int
    serial: int  # this step's number among the CPU path's steps
    # The previous step's serial when this batch continues its decode batch (see the
    # module docstring), else None.
    continues: int | None = None
    # By (sliding window, width).
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)
    # The gathered K/V, reused by every layer of the step (one allocation, not one each).
    buffer: torch.Tensor | None = None
    # append_rows's answer, for the (kv_heads, capacity) it was asked for.
    append_index: tuple[tuple[int, int], torch.Tensor] | None = None

    def mask(self, sliding_window: int | None, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, width] additive mask (0 or -inf) over the padded key positions
        (additive: SDPA on the CPU measured faster with it than with a boolean one)."""
        key = (sliding_window, width)
        if key not in self.masks:
            positions = torch.arange(width)[None, :]
            allowed = positions < self.seq_lens[:, None]
            if sliding_window is not None:
                allowed &= positions >= self.seq_lens[:, None] - sliding_window
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -torch.inf)
            self.masks[key] = additive[:, None, None, :]
        return self.masks[key]

    def append_rows(self, num_kv_heads: int, capacity: int) -> torch.Tensor:
        """[B * kv_heads] rows of a dense copy [2, B, kv_heads, capacity, d] seen as
        [2, rows, d] where each sequence's newest token goes, head by head."""
        key = (num_kv_heads, capacity)
        if self.append_index is None or self.append_index[0] != key:
            heads = torch.arange(self.seq_lens.shape[0])[:, None] * num_kv_heads
            heads = heads + torch.arange(num_kv_heads)[None, :]
            rows = heads * capacity + (self.seq_lens - 1)[:, None]
            self.append_index = (key, rows.flatten())
        return self.append_index[1]

    def gather(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """Every sequence's blocks of K and V: [2, B * blocks, block_size * kv_heads *
        head_dim] in the cache's dtype."""
        flat = kv_cache.view(2, kv_cache.shape[1], -1)
        shape = (2, self.block_ids.shape[0], flat.shape[2])
        if self.buffer is None or self.buffer.dtype != kv_cache.dtype:
            self.buffer = torch.empty(shape, dtype=kv_cache.dtype)
        return torch.index_select(flat, 1, self.block_ids, out=self.buffer)


@dataclass
class _Chunk:
    """A prefill or extend chunk: query rows [start, end) at the last positions of seq_len."""

    start: int
    end: int
    seq_len: int
    block_ids: torch.Tensor  # [blocks] int64
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[L, seq_len] bool, or None when plain top-left causal masking is exact (no
        cached prefix and no window)."""
        if sliding_window not in self.masks:
            query_len = self.end - self.start
            if sliding_window is None and query_len == self.seq_len:
                self.masks[sliding_window] = None
            else:
                q_pos = torch.arange(self.seq_len - query_len, self.seq_len)[:, None]
                k_pos = torch.arange(self.seq_len)[None, :]
                allowed = k_pos <= q_pos
                if sliding_window is not None:
                    allowed &= k_pos > q_pos - sliding_window
                self.masks[sliding_window] = allowed
        return self.masks[sliding_window]


@dataclass
class CpuAttentionPlan:
    """What every layer of one step needs to read its paged context, built once."""

    decode: _DecodeBatch | None
    chunks: list[_Chunk]


@dataclass
class _DenseKV:
    """A layer's decode batch's K/V per sequence: [2, B, kv_heads, capacity, head_dim],
    holding each sequence's context as of step ``serial``."""

    serial: int
    buffer: torch.Tensor


@dataclass(frozen=True)
class _StepRecord:
    """What the next step compares itself with: the last decode-only step's batch."""

    serial: int
    seq_lens: torch.Tensor
    tables: torch.Tensor


_step_serials = itertools.count()
# The last plan's decode batch (None: that step had prefill chunks or no decodes).
_last_decode: _StepRecord | None = None


def _continues(decode: _DecodeBatch, last: _StepRecord | None, block_size: int) -> bool:
    """``decode`` is ``last``'s batch one token further: same sequences in the same
    order, each one longer, every block ``last`` read still in place."""
    if last is None or last.seq_lens.shape != decode.seq_lens.shape:
        return False
    if not torch.equal(decode.seq_lens, last.seq_lens + 1):
        return False
    old_width = last.tables.shape[1]
    if decode.tables.shape[1] < old_width:
        return False
    used = (
        torch.arange(old_width)[None, :] < (last.seq_lens[:, None] + block_size - 1) // block_size
    )
    same = decode.tables[:, :old_width] == last.tables
    return bool((same | ~used).all())


def build_plan(metadata: AttentionMetadata, block_size: int) -> CpuAttentionPlan:
    starts = metadata.query_start_loc_cpu
    seq_lens = metadata.seq_lens_cpu
    tables = metadata.block_tables
    decode_seqs = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    chunks = [
        _Chunk(starts[i], starts[i + 1], seq_lens[i], tables[i, : -(-seq_lens[i] // block_size)])
        for i in range(len(seq_lens))
        if starts[i + 1] - starts[i] > 1
    ]
    for chunk in chunks:
        chunk.block_ids = chunk.block_ids.long()
    global _last_decode
    decode = None
    if decode_seqs:
        index = torch.tensor(decode_seqs, dtype=torch.long)
        lens = metadata.seq_lens[index].long()
        longest = max(seq_lens[i] for i in decode_seqs)
        width = -(-longest // block_size)
        decode_tables = tables[index, :width].long()
        decode = _DecodeBatch(
            rows=metadata.query_start_loc[index].long(),
            block_ids=decode_tables.flatten(),
            seq_lens=lens,
            num_blocks=width,
            tables=decode_tables,
            max_seq_len=longest,
            serial=next(_step_serials),
        )
    plain = decode is not None and not chunks and _one_row_per_sequence(metadata, block_size)
    if plain and _continues(decode, _last_decode, block_size):
        assert _last_decode is not None
        decode.continues = _last_decode.serial
    _last_decode = _StepRecord(decode.serial, decode.seq_lens, decode.tables) if plain else None
    return CpuAttentionPlan(decode, chunks)


def _one_row_per_sequence(metadata: AttentionMetadata, block_size: int) -> bool:
    """No two rows of a decode-only step write into one block: each row is its own
    sequence (a sequence's block being written is its own). A verify step's rows are one
    sequence's tokens, and the next step rewrites the positions of its rejected drafts,
    which a dense copy of the row after them would keep. (A padding row, slot -1, writes
    nothing.)"""
    blocks = [slot // block_size for slot in metadata.slot_mapping.tolist() if slot >= 0]
    return len(set(blocks)) == len(blocks)


def _widen(kv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gathered K/V in the queries' dtype: an fp8 cache widens after the gather has read
    its narrow bytes."""
    return kv if kv.dtype == dtype else kv.to(dtype)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its paged context; the
    contract of ``reference.paged_attention`` (query [tokens, heads, head_dim])."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    plan = metadata.host_plan
    if not isinstance(plan, CpuAttentionPlan):
        plan = metadata.host_plan = build_plan(metadata, block_size)
    decode = plan.decode
    only_decodes = not plan.chunks
    out = None if only_decodes else torch.empty_like(query)
    if (
        decode is not None
        and only_decodes
        and kv_cache.dtype == query.dtype
        and kv_cache.is_contiguous()
        and not _has_padding_slots(metadata.slot_mapping)
    ):
        dense = _dense_kv(kv_cache, decode, metadata.slot_mapping)
        if dense is not None:
            batch, width = decode.rows.shape[0], decode.max_seq_len
            q = query.view(batch, num_kv_heads, group, head_dim)
            mask = decode.mask(sliding_window, width, query.dtype)
            keys, values = dense[0, :, :, :width], dense[1, :, :, :width]
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            return attended.view(batch, num_heads, head_dim)
    elif decode is None or not only_decodes:
        kv_cache._lanner_dense = None  # type: ignore[attr-defined]  # free it between decodes
    if decode is not None:
        batch = decode.rows.shape[0]
        width = decode.num_blocks * block_size
        kv = _widen(decode.gather(kv_cache), query.dtype)
        # [2, B * blocks, block * kv_heads * d] -> K, V as [B, kv_heads, width, d]
        kv = kv.view(2, batch, width, num_kv_heads, head_dim).transpose(2, 3)
        # Only decodes: row i is sequence i, so no gather of queries nor scatter of outputs.
        q = query if only_decodes else query[decode.rows]
        q = q.view(batch, num_kv_heads, group, head_dim)
        mask = decode.mask(sliding_window, width, query.dtype)
        attended = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=scale)
        attended = attended.view(batch, num_heads, head_dim)
        if only_decodes:
            return attended
        out[decode.rows] = attended
    for chunk in plan.chunks:
        kv = _widen(kv_cache.index_select(1, chunk.block_ids), query.dtype)
        kv = kv.reshape(2, -1, num_kv_heads, head_dim)[:, : chunk.seq_len].transpose(1, 2)
        q = query[chunk.start : chunk.end].transpose(0, 1)  # [heads, L, d]
        mask = chunk.mask(sliding_window)
        attended = F.scaled_dot_product_attention(
            q,
            kv[0],
            kv[1],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[chunk.start : chunk.end] = attended.transpose(0, 1)
    assert out is not None
    return out


def _dense_kv(
    kv_cache: torch.Tensor, decode: _DecodeBatch, slot_mapping: torch.Tensor
) -> torch.Tensor | None:
    """This layer's dense copy of the decode batch's context, brought up to this step:
    the step's new K/V rows appended when the batch continues the copy's step, else
    rebuilt from the paged cache; None when it would outgrow DENSE_MAX_BYTES."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    batch = decode.rows.shape[0]
    state: _DenseKV | None = getattr(kv_cache, "_lanner_dense", None)
    if (
        state is not None
        and decode.continues is not None
        and state.serial == decode.continues
        and state.buffer.shape[3] >= decode.max_seq_len
    ):
        # Rows are sequences (only decodes): row i's new token sits at seq_lens[i] - 1.
        new = kv_cache.view(2, -1, head_dim)[:, _cache_rows(slot_mapping, num_kv_heads)]
        rows = decode.append_rows(num_kv_heads, state.buffer.shape[3])
        state.buffer.view(2, -1, head_dim).index_copy_(1, rows, new)
        state.serial = decode.serial
        return state.buffer
    gathered_len = decode.num_blocks * block_size
    capacity = gathered_len + DENSE_HEADROOM
    shape = (2, batch, num_kv_heads, capacity, head_dim)
    if 2 * batch * num_kv_heads * capacity * head_dim * kv_cache.element_size() > DENSE_MAX_BYTES:
        kv_cache._lanner_dense = None  # type: ignore[attr-defined]
        return None
    if (
        state is not None
        and state.buffer.shape[:3] == shape[:3]
        and state.buffer.shape[3] >= capacity
    ):
        buffer = state.buffer  # reuse the allocation
    else:
        buffer = torch.empty(shape, dtype=kv_cache.dtype)
    gathered = decode.gather(kv_cache).view(2, batch, gathered_len, num_kv_heads, head_dim)
    buffer[:, :, :, :gathered_len].copy_(gathered.transpose(2, 3))
    # The room past the gathered blocks: a shorter sequence's keys there stay unwritten
    # while the longest grows into it, and are masked; masked, they must still be finite
    # (SDPA weighs them by 0, and 0 * NaN is NaN).
    buffer[:, :, :, gathered_len:].zero_()
    kv_cache._lanner_dense = _DenseKV(decode.serial, buffer)  # type: ignore[attr-defined]
    return buffer


_last_cache_rows: tuple[torch.Tensor, int, torch.Tensor] | None = None


def _cache_rows(slot_mapping: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T * kv_heads] rows of a paged cache seen as [2, rows, d] that hold the step's new
    tokens, head by head; once a step (every layer passes the same slot mapping)."""
    global _last_cache_rows
    last = _last_cache_rows
    if last is not None and last[0] is slot_mapping and last[1] == num_kv_heads:
        return last[2]
    heads = torch.arange(num_kv_heads)[None, :]
    rows = (slot_mapping[:, None] * num_kv_heads + heads).flatten()
    _last_cache_rows = (slot_mapping, num_kv_heads, rows)
    return rows
