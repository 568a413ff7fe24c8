"""Chooses each operation's implementation: the Triton kernel for CUDA tensors, the CPU
path (batched torch ops) for CPU tensors, and the pure-torch reference everywhere under
LANNER_KERNELS=reference (the oracle both are tested against)."""

from __future__ import annotations

import os

import torch

from lanner.kernels import activation, cpu_attention, reference
from lanner.kernels import paged_attention as attention_kernels
from lanner.kernels import qkv_prepare as qkv_kernels
from lanner.kernels import rms_norm as norm_kernels
from lanner.kernels import skinny_matmul as skinny_kernels
from lanner.kernels.attention_metadata import AttentionMetadata

# Set from the environment at import; tests and benchmarks may flip it to compare paths.
FORCE_REFERENCE = os.environ.get("LANNER_KERNELS", "triton") == "reference"


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def use_cpu_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not FORCE_REFERENCE


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): a decode step's few rows stream the weight through the
    skinny Triton kernel (cuBLAS reached ~40-90 % of copy bandwidth there); larger
    batches and the reference path take torch's GEMM."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if use_triton(x) and skinny_kernels.use_skinny(m, *weight.shape):
        return skinny_kernels.skinny_matmul(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return norm_kernels.rms_norm(x, weight, eps)
    if use_cpu_path(x) and x.dtype == torch.float32:
        # One fused call; in float32 the reference's arithmetic (no casts to round at).
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return norm_kernels.fused_add_rms_norm(x, residual, weight, eps)
    if use_cpu_path(x):
        summed = x + residual
        return rms_norm(summed, weight, eps), summed
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return activation.silu_and_mul(x)
    return reference.silu_and_mul(x)


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
    """Per-head q/k RMSNorm (when weights are given), rotary, and K/V into the cache;
    returns the queries attention needs."""
    if use_triton(query):
        return qkv_kernels.qkv_prepare(
            query,
            key,
            value,
            positions,
            cos_sin_cache,
            cache,
            slot_mapping,
            q_norm_weight,
            k_norm_weight,
            eps,
        )
    if use_cpu_path(query):
        return cpu_attention.qkv_prepare(
            query,
            key,
            value,
            positions,
            cos_sin_cache,
            cache,
            slot_mapping,
            q_norm_weight,
            k_norm_weight,
            eps,
        )
    if q_norm_weight is not None and k_norm_weight is not None:
        query = reference.rms_norm(query, q_norm_weight, eps)
        key = reference.rms_norm(key, k_norm_weight, eps)
    query = reference.apply_rotary(query, positions, cos_sin_cache)
    key = reference.apply_rotary(key, positions, cos_sin_cache)
    reference.store_kv_cache(key, value, cache, slot_mapping)
    return query


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    # Prefill chunks with no cached prefix could go to torch's varlen flash attention,
    # but on the H100 it measured no faster than our kernel at these lengths (45-57 %
    # of cuDNN SDPA vs 48-63 %: benchmarks/results/20261127-042212-kernels-attention.json),
    # so every chunk reads the paged cache through one Triton kernel.
    if use_triton(query):
        return attention_kernels.paged_attention(query, kv_cache, metadata, scale, sliding_window)
    if use_cpu_path(query):
        return cpu_attention.paged_attention(query, kv_cache, metadata, scale, sliding_window)
    return reference.paged_attention(query, kv_cache, metadata, scale, sliding_window)
