"""Pure-torch reference implementations of every kernel: the CPU path and the test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lanner.kernels.attention_metadata import AttentionMetadata

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled after casting back (as HF Llama does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then RMSNorm of the sum; returns (normed, new residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of the last dim times its second half (gate * up)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] by each token's position.

    ``cos_sin_cache`` is [max_positions, head_dim] float32: cos in the first half,
    sin in the second. Pairs are (i, i + head_dim/2), the rotate-half layout of HF.
    """
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def store_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new K/V [tokens, kv_heads, head_dim] into the paged cache
    [2, num_blocks, block_size, kv_heads, head_dim] at their slots; slot -1 is skipped."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(key[valid], kv_cache.dtype)
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = to_cache_dtype(
        value[valid], kv_cache.dtype
    )


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the cache's dtype; float8 saturates at its largest value, as the GPU's
    conversion does (torch's cast would give NaN past it)."""
    if dtype == x.dtype:
        return x
    if dtype == torch.float8_e4m3fn:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's first ``seq_len`` cached K and V [seq_len, kv_heads, head_dim]."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    key = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return key, value


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its cached context.

    query: [tokens, heads, head_dim]; returns the same shape. Query row j of a
    sequence with query_len L and context S sits at position S - L + j and sees
    keys at positions <= its own (and > its own - sliding_window, if set).
    Works for prefill, chunked prefill on top of a cached prefix, and decode.
    """
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_cpu
    for i, seq_len in enumerate(metadata.seq_lens_cpu):
        q = query[starts[i] : starts[i + 1]].float()
        query_len = q.shape[0]
        key, value = gather_kv(kv_cache, metadata.block_tables[i], seq_len)
        key = key.float().repeat_interleave(group, dim=1)
        value = value.float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q, key) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, value).to(out.dtype)
    return out


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor, bitmask_rows: torch.Tensor
) -> None:
    """In place: logits[rows[i], j] = -inf wherever bit j of bitmask[bitmask_rows[i]] is 0
    (xgrammar's layout: int32 words, bit j of word w for token 32 * w + j)."""
    vocab_size = logits.shape[1]
    tokens = torch.arange(vocab_size, device=logits.device)
    words = bitmask[bitmask_rows].to(torch.int64)[:, tokens // 32]  # sign bits fold in the &
    allowed = ((words >> (tokens % 32)) & 1) != 0
    for index, row in enumerate(rows.tolist()):
        logits[row].masked_fill_(~allowed[index], float("-inf"))
