"""Chooses each operation's implementation: the Triton kernel for CUDA tensors, the
pure-torch reference otherwise (the CPU, or LANNER_KERNELS=reference to compare)."""

from __future__ import annotations

import inspect
import logging
import os

import torch

from lanner.kernels import activation, kv_cache, reference, rotary
from lanner.kernels import paged_attention as attention_kernels
from lanner.kernels import rms_norm as norm_kernels
from lanner.kernels.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# Set from the environment at import; tests and benchmarks may flip it to compare paths.
FORCE_REFERENCE = os.environ.get("LANNER_KERNELS", "triton") == "reference"
# Prefill chunks with no cached context: "flash" sends them to torch's varlen flash
# attention (faster than our Triton kernel, measured on the H100), "triton" keeps them.
PREFILL_BACKEND = os.environ.get("LANNER_PREFILL_BACKEND", "flash")

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_TAKES_GQA = "enable_gqa" in inspect.signature(_varlen_attn).parameters
except ImportError:  # an older torch
    _varlen_attn = None
    _VARLEN_TAKES_GQA = False


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return norm_kernels.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return norm_kernels.fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return activation.silu_and_mul(x)
    return reference.silu_and_mul(x)


def apply_rotary_qk(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(query):
        return rotary.apply_rotary_qk(query, key, positions, cos_sin_cache)
    return (
        reference.apply_rotary(query, positions, cos_sin_cache),
        reference.apply_rotary(key, positions, cos_sin_cache),
    )


def store_kv_cache(
    key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if use_triton(key):
        kv_cache.store_kv_cache(key, value, cache, slot_mapping)
    else:
        reference.store_kv_cache(key, value, cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of the batch's queries; ``key``/``value`` are this step's new K/V,
    already written to ``kv_cache`` (the flash path reads them directly)."""
    if not use_triton(query):
        return reference.paged_attention(query, kv_cache, metadata, scale, sliding_window)
    if not (metadata.num_fresh_tokens and _flash_prefill_usable()):
        return attention_kernels.paged_attention(query, kv_cache, metadata, scale, sliding_window)
    out = torch.empty_like(query)
    if metadata.num_decode:
        attention_kernels.decode_attention(query, kv_cache, metadata, scale, sliding_window, out)
    if metadata.num_extend:
        attention_kernels.prefill_attention(
            query,
            kv_cache,
            metadata,
            scale,
            sliding_window,
            out,
            seq_indices=metadata.extend_seq_indices,
        )
    try:
        _flash_fresh_prefills(query, key, value, metadata, scale, sliding_window, out)
    except RuntimeError as err:  # e.g. a torch without GQA in its varlen kernel
        global PREFILL_BACKEND
        PREFILL_BACKEND = "triton"
        logger.warning("varlen flash attention failed (%s); using the Triton kernel", err)
        attention_kernels.prefill_attention(
            query,
            kv_cache,
            metadata,
            scale,
            sliding_window,
            out,
            seq_indices=metadata.prefill_seq_indices,
        )
    return out


def _flash_prefill_usable() -> bool:
    return PREFILL_BACKEND == "flash" and _varlen_attn is not None


def _flash_fresh_prefills(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """Causal attention of the prefill chunks with no cached context, on their own K/V."""
    whole = metadata.num_fresh_tokens == query.shape[0]
    rows = metadata.fresh_rows
    q, k, v = (query, key, value) if whole else (query[rows], key[rows], value[rows])
    options: dict = {
        "scale": scale,
        # (left, right) window: causal, and the sliding window's reach to the left
        "window_size": (-1 if sliding_window is None else sliding_window - 1, 0),
    }
    if _VARLEN_TAKES_GQA:
        options["enable_gqa"] = True
    cu = metadata.fresh_cu_seqlens
    length = metadata.fresh_max_len
    result = _varlen_attn(q, k, v, cu, cu, length, length, **options)
    if whole:
        out.copy_(result)
    else:
        out.index_copy_(0, rows, result)
