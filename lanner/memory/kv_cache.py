"""Allocation of the paged KV cache: one [2, num_blocks, block_size, kv_heads, head_dim]
tensor per layer."""

from __future__ import annotations

import torch

from lanner.model.config import ModelConfig


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * element
    return per_layer * config.num_hidden_layers


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
    shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
    ]
