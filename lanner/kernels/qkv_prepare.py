"""One launch from projected q/k/v to what attention reads: Qwen3's per-head RMSNorm of q
and k (when given), rotary embedding of both, and K/V written into the paged cache.
Replaces four launches per layer (q norm, k norm, rotary, cache store) in decode steps,
where launches, not bytes, set the time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.reference import FP8_MAX
from lanner.kernels.rms_norm import cast_rounded

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _to_cache(x, cache_ptr):
    """Round to the cache's element type; e4m3 saturates at +-FP8_MAX, as the reference."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -_FP8_MAX, _FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _norm_rotate(
    src_ptr,
    stride_head,
    norm_ptr,
    eps,
    cos,
    sin,
    heads,
    cols,
    mask,
    HALF: tl.constexpr,
    NORM: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """Load a tile of heads [H, 2*HALF], RMS-normalize each head (optional), rotate it;
    returns both halves in fp32, rounded where the unfused ops round."""
    src = src_ptr + heads[:, None] * stride_head + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        squares = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
        rstd = tl.rsqrt(squares / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        # Reference rounding: normalize, round to the dtype, scale by the weight, round.
        x1 = cast_rounded(cast_rounded(x1 * rstd, OUT_DTYPE).to(tl.float32) * w1, OUT_DTYPE)
        x2 = cast_rounded(cast_rounded(x2 * rstd, OUT_DTYPE).to(tl.float32) * w2, OUT_DTYPE)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _qkv_prepare_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cos_sin,
    stride_slot,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + cols, mask=col_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + cols, mask=col_mask, other=0.0)
    dtype = q_out_ptr.dtype.element_ty

    q_heads = tl.arange(0, Q_HEADS_PAD)
    q_mask = (q_heads < NUM_Q_HEADS)[:, None] & col_mask[None, :]
    q1, q2 = _norm_rotate(
        q_ptr + token * stride_q_tok,
        stride_q_head,
        q_norm_ptr,
        eps,
        cos,
        sin,
        q_heads,
        cols,
        q_mask,
        HALF,
        NORM,
        dtype,
    )
    q_dst = q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF) + q_heads[:, None] * (2 * HALF)
    tl.store(q_dst + cols[None, :], cast_rounded(q1, dtype), mask=q_mask)
    tl.store(q_dst + HALF + cols[None, :], cast_rounded(q2, dtype), mask=q_mask)

    slot = tl.load(slots_ptr + token)
    if slot >= 0:  # padding tokens (slot -1) write nothing
        kv_heads = tl.arange(0, KV_HEADS_PAD)
        kv_mask = (kv_heads < NUM_KV_HEADS)[:, None] & col_mask[None, :]
        k1, k2 = _norm_rotate(
            k_ptr + token * stride_k_tok,
            stride_k_head,
            k_norm_ptr,
            eps,
            cos,
            sin,
            kv_heads,
            cols,
            kv_mask,
            HALF,
            NORM,
            dtype,
        )
        cache_row = slot * stride_slot + kv_heads[:, None] * (2 * HALF)
        k_dst = k_cache_ptr + cache_row
        k1 = _to_cache(cast_rounded(k1, dtype), k_cache_ptr)
        k2 = _to_cache(cast_rounded(k2, dtype), k_cache_ptr)
        tl.store(k_dst + cols[None, :], k1, mask=kv_mask)
        tl.store(k_dst + HALF + cols[None, :], k2, mask=kv_mask)
        v_src = v_ptr + token * stride_v_tok + kv_heads[:, None] * stride_v_head + cols[None, :]
        v_dst = v_cache_ptr + cache_row + cols[None, :]
        v1 = _to_cache(tl.load(v_src, mask=kv_mask), v_cache_ptr)
        v2 = _to_cache(tl.load(v_src + HALF, mask=kv_mask), v_cache_ptr)
        tl.store(v_dst, v1, mask=kv_mask)
        tl.store(v_dst + HALF, v2, mask=kv_mask)


def qkv_prepare(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rotated (and, with norm weights, normalized) queries as a new [T, H, D] tensor;
    rotated keys and the values go straight into ``kv_cache`` at ``slot_mapping``.
    q/k/v may be strided views of one qkv tensor; the last dim must be contiguous."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if head_dim % 2 or any(t.stride(-1) != 1 for t in (query, key, value)):
        raise ValueError("qkv_prepare needs an even head_dim and contiguous last dims")
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return q_out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    norm = q_norm_weight is not None and k_norm_weight is not None
    half = head_dim // 2
    _qkv_prepare_kernel[(num_tokens,)](
        query,
        key,
        value,
        positions,
        cos_sin_cache,
        q_out,
        k_cache,
        v_cache,
        slot_mapping,
        q_norm_weight if norm else query,
        k_norm_weight if norm else query,
        eps,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos_sin_cache.stride(0),
        num_kv_heads * head_dim,  # one slot of a contiguous [blocks, block_size, H, D] cache
        NUM_Q_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        NORM=norm,
        num_warps=4,
        **launch_options(query),
    )
    return q_out
