"""Allocation of the paged KV cache: one [2, num_blocks, block_size, kv_heads, head_dim]
tensor per layer."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lanner.model.config import ModelConfig

# kv_cache_dtype names: "auto" keeps the model's dtype; fp8 stores K/V as float8 e4m3
# (per-tensor scale 1.0, saturating at +-448, as vLLM's default fp8 cache), which halves
# the bytes every decode step reads and doubles the tokens the cache holds.
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    if kv_cache_dtype == "auto":
        return model_dtype
    return KV_CACHE_DTYPES[kv_cache_dtype]


def kv_cache_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None
) -> int:
    """Bytes one block takes across all layers (K and V). ``num_kv_heads``: the heads this
    cache holds (a tensor-parallel rank's; default the model's)."""
    element = torch.empty((), dtype=dtype).element_size()
    heads = num_kv_heads or config.num_key_value_heads
    per_layer = 2 * block_size * heads * config.head_dim * element
    return per_layer * config.num_hidden_layers


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    num_kv_heads: int | None = None,
) -> list[torch.Tensor]:
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
    shape = (2, num_blocks, block_size, num_kv_heads or config.num_key_value_heads, config.head_dim)
    if torch.device(device).type == "cpu":
        return [_zeros_on_demand(shape, dtype) for _ in range(config.num_hidden_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose memory the OS maps only when a page is first written
    (numpy's calloc'd zeros; torch.zeros writes every page): the cache then holds
    resident memory for the blocks requests have used, not for its whole size."""
    import numpy

    element = torch.empty((), dtype=dtype).element_size()
    raw = numpy.zeros(math.prod(shape) * element, dtype=numpy.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


@dataclass(frozen=True)
class CacheConfig:
    """How large the paged KV cache is and how it is cut into blocks."""

    block_size: int = 16
    # CUDA: share of device memory for weights + activations + KV cache.
    gpu_memory_utilization: float = 0.9
    # Bytes of KV cache, on any device. Unset on the CPU: LANNER_CPU_KVCACHE_SPACE (GiB),
    # else what max_num_seqs requests of max_model_len tokens can use, at most 2 GiB.
    kv_cache_memory_bytes: int | None = None
    # Exact number of blocks, overriding both of the above.
    num_gpu_blocks_override: int | None = None
    # Keep full computed blocks in a radix tree so later requests reuse their K/V.
    enable_prefix_caching: bool = True
    # "auto" (the model's dtype) or "fp8" / "fp8_e4m3".
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )


DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
# vLLM's VLLM_CPU_KVCACHE_SPACE under our prefix: the CPU's KV cache in GiB.
CPU_KVCACHE_SPACE_ENV = "LANNER_CPU_KVCACHE_SPACE"


def cpu_kv_cache_space_bytes() -> int | None:
    """LANNER_CPU_KVCACHE_SPACE in bytes, or None when it is unset."""
    text = os.environ.get(CPU_KVCACHE_SPACE_ENV, "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(
            f"{CPU_KVCACHE_SPACE_ENV} is the CPU KV cache size in GiB (e.g. 4 or 0.5), got {text!r}"
        )
    return int(gib * 2**30)


def num_blocks_for_memory(
    cache: CacheConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    peak_memory_bytes: int | None,
    useful_blocks: int,
    extra_bytes_per_block: int = 0,
    num_kv_heads: int | None = None,
) -> int:
    """How many KV blocks fit. On CUDA: what ``gpu_memory_utilization`` of the device
    leaves after the profiled peak (weights + activations) and other processes' memory.
    On the CPU: LANNER_CPU_KVCACHE_SPACE when set, else what ``useful_blocks`` (every
    sequence of a full batch at max_model_len) need, at most 2 GiB. ``kv_cache_memory_bytes``
    overrides both, anywhere. ``extra_bytes_per_block``: another cache in the same blocks
    (a draft model's). ``num_kv_heads``: the heads this device's cache holds (a
    tensor-parallel rank's)."""
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = (
        kv_cache_bytes_per_block(model, cache.block_size, dtype, num_kv_heads)
        + extra_bytes_per_block
    )
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes // per_block
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        not_ours = total - free - torch.cuda.memory_reserved(device)
        available = total * cache.gpu_memory_utilization - (peak_memory_bytes or 0) - not_ours
        if available < per_block:
            raise ValueError(
                f"no memory left for the KV cache: weights and activations peak at "
                f"{(peak_memory_bytes or 0) / 2**30:.2f} GiB of {total / 2**30:.2f} GiB; raise "
                f"gpu_memory_utilization (now {cache.gpu_memory_utilization}) or lower "
                f"max_num_batched_tokens / max_num_seqs"
            )
        return int(available // per_block)
    space = cpu_kv_cache_space_bytes()
    if space is not None:
        return max(1, space // per_block)
    return max(1, min(DEFAULT_CPU_KV_CACHE_BYTES // per_block, useful_blocks))
