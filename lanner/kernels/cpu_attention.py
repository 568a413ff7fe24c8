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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.reference import rms_norm, to_cache_dtype


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
    query = _rotate(query, cos_full, sin_signed)
    key = _rotate(key, cos_full, sin_signed)
    num_kv_heads, head_dim = cache.shape[-2:]
    # index_copy_ has no float8 kernel: an fp8 cache is written as its bytes.
    as_stored = torch.uint8 if cache.element_size() == 1 else cache.dtype
    slots = cache.view(as_stored).view(2, -1, num_kv_heads, head_dim)
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        # Rows with slot -1 store nothing (a draft head's padding rows).
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    for index, new in enumerate((key, value)):
        slots[index].index_copy_(0, slot_mapping, to_cache_dtype(new, cache.dtype).view(as_stored))
    return query


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
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    # The gathered K/V, reused by every layer of the step (one allocation, not one each).
    buffer: torch.Tensor | None = None

    def mask(self, sliding_window: int | None, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, width] additive mask (0 or -inf) over the padded key positions
        (additive: SDPA on the CPU measured faster with it than with a boolean one)."""
        if sliding_window not in self.masks:
            positions = torch.arange(width)[None, :]
            allowed = positions < self.seq_lens[:, None]
            if sliding_window is not None:
                allowed &= positions >= self.seq_lens[:, None] - sliding_window
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -torch.inf)
            self.masks[sliding_window] = additive[:, None, None, :]
        return self.masks[sliding_window]

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
    decode = None
    if decode_seqs:
        index = torch.tensor(decode_seqs, dtype=torch.long)
        lens = metadata.seq_lens[index].long()
        width = -(-max(seq_lens[i] for i in decode_seqs) // block_size)
        decode = _DecodeBatch(
            rows=metadata.query_start_loc[index].long(),
            block_ids=tables[index, :width].long().flatten(),
            seq_lens=lens,
            num_blocks=width,
        )
    return CpuAttentionPlan(decode, chunks)


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
