"""Triton write of this step's K/V into the paged cache, skipping padding slots (-1) on device."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 2048


@triton.jit
def _store_kv_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_mapping_ptr,
    key_stride_token,
    key_stride_head,
    value_stride_token,
    value_stride_head,
    cache_stride_kv,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    slot_stride,
    block_size,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
):
    # One program per token. A negative slot (padding) masks every load and store, so the
    # decision is made on the device and the host never looks at slot values.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token * slot_stride).to(tl.int64)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    block = slot // block_size
    offset = slot % block_size
    key_dst = cache_ptr + block * cache_stride_block + offset * cache_stride_offset
    value_dst = key_dst + cache_stride_kv
    key_src = key_ptr + token * key_stride_token
    value_src = value_ptr + token * value_stride_token
    out_dtype = cache_ptr.dtype.element_ty

    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_DIM)
    dim_mask = (dims < HEAD_DIM)[None, :] & valid
    for first_head in tl.static_range(0, NUM_HEADS, BLOCK_HEADS):
        head = (first_head + heads)[:, None]
        mask = (head < NUM_HEADS) & dim_mask
        key = tl.load(key_src + head * key_stride_head + dims[None, :], mask=mask)
        value = tl.load(value_src + head * value_stride_head + dims[None, :], mask=mask)
        dst = head * cache_stride_head + dims[None, :]
        tl.store(key_dst + dst, key.to(out_dtype), mask=mask)
        tl.store(value_dst + dst, value.to(out_dtype), mask=mask)


@functools.cache
def _launch_config(num_heads: int, head_dim: int) -> tuple[int, int]:
    block_dim = triton.next_power_of_2(head_dim)
    block_heads = max(1, min(triton.next_power_of_2(num_heads), _TILE_ELEMENTS // block_dim))
    return block_heads, block_dim


def store_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value [tokens, kv_heads, head_dim] (strided views are fine) into
    kv_cache [2, num_blocks, block_size, kv_heads, head_dim] at slot_mapping's slots
    (slot = block * block_size + offset; -1 skips the token).

    One launch, no allocation, no host sync: safe inside a CUDA graph. Slots are not
    bounds-checked. The last dim of key, value and kv_cache must be contiguous.
    """
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_tokens = key.shape[0]
    if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
            f"[tokens, {num_kv_heads}, {head_dim}] to fit kv_cache {tuple(kv_cache.shape)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != ({num_tokens},)")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        # Copying here would allocate, which a CUDA graph capture must not do silently.
        raise ValueError("key, value and kv_cache need a contiguous last (head_dim) dim")
    if num_tokens == 0:
        return
    block_heads, block_dim = _launch_config(num_kv_heads, head_dim)
    _store_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        slot_mapping.stride(0),
        block_size,
        NUM_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_HEADS=block_heads,
        BLOCK_DIM=block_dim,
        num_warps=4,
    )
