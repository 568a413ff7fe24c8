"""Triton rotary position embedding (rotate-half layout) for q alone or q and k in one launch."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lanner.kernels.rms_norm import cast_rounded

# Elements of one half-head tile a program rotates at a time: heads are walked in chunks.
_TILE_ELEMENTS = 2048


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_head,
    cos,
    sin,
    cols,
    col_mask,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """Rotate one token's heads: src is strided by head, dst is a contiguous [heads, 2 * HALF]."""
    heads = tl.arange(0, BLOCK_HEADS)
    for first_head in tl.static_range(0, NUM_HEADS, BLOCK_HEADS):
        head = first_head + heads
        mask = (head < NUM_HEADS)[:, None] & col_mask[None, :]
        src = src_ptr + head[:, None] * stride_head + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        dst = dst_ptr + head[:, None] * (2 * HALF) + cols[None, :]
        tl.store(dst, cast_rounded(out1, dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, cast_rounded(out2, dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    cos_sin_ptr,
    q_ptr,
    q_out_ptr,
    k_ptr,
    k_out_ptr,
    positions_stride,
    cos_sin_stride,
    q_stride_token,
    q_stride_head,
    k_stride_token,
    k_stride_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    HAS_K: tl.constexpr,
):
    # One program per token: its cos/sin row is read once and shared by every q and k head.
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token * positions_stride).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    row = cos_sin_ptr + position * cos_sin_stride
    cos = tl.load(row + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * q_stride_token,
        q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF),
        q_stride_head,
        cos,
        sin,
        cols,
        col_mask,
        NUM_Q_HEADS,
        HALF,
        BLOCK_Q_HEADS,
    )
    if HAS_K:
        _rotate_heads(
            k_ptr + token * k_stride_token,
            k_out_ptr + token * (NUM_K_HEADS * 2 * HALF),
            k_stride_head,
            cos,
            sin,
            cols,
            col_mask,
            NUM_K_HEADS,
            HALF,
            BLOCK_K_HEADS,
        )


@functools.cache
def _block_heads(num_heads: int, block_half: int) -> int:
    return max(1, min(triton.next_power_of_2(num_heads), _TILE_ELEMENTS // block_half))


def _check(x: torch.Tensor, cos_sin_cache: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(
            f"{name} head_dim {head_dim} must be even and equal cos_sin_cache's last dim "
            f"{cos_sin_cache.shape[-1]}"
        )
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    q = _check(q, cos_sin_cache, "q")
    num_tokens, num_q_heads, head_dim = q.shape
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({num_tokens},)")
    if k is not None:
        k = _check(k, cos_sin_cache, "k")
        if k.shape[0] != num_tokens or k.shape[2] != head_dim:
            raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out

    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    num_k_heads = 0 if k is None else k.shape[1]
    k_arg = q if k is None else k
    _rotary_kernel[(num_tokens,)](
        positions,
        cos_sin_cache,
        q,
        q_out,
        k_arg,
        q_out if k_out is None else k_out,
        positions.stride(0),
        cos_sin_cache.stride(0),
        q.stride(0),
        q.stride(1),
        k_arg.stride(0),
        k_arg.stride(1),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_Q_HEADS=_block_heads(num_q_heads, block_half),
        BLOCK_K_HEADS=_block_heads(max(num_k_heads, 1), block_half),
        HAS_K=k is not None,
        num_warps=4,
    )
    return q_out, k_out


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] (a strided view is fine) by each token's position.

    ``cos_sin_cache`` is float32 [max_positions, head_dim], cos then sin; math in fp32,
    result in ``x.dtype`` as a new contiguous tensor. Positions are not bounds-checked.
    """
    out, _ = _launch(x, None, positions, cos_sin_cache)
    return out


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(apply_rotary(q, ...), apply_rotary(k, ...))`` in a single launch over tokens."""
    q_out, k_out = _launch(q, k, positions, cos_sin_cache)
    assert k_out is not None
    return q_out, k_out
