"""Chooses each operation's implementation: the Triton kernel for CUDA tensors, the CPU
path (batched torch ops) for CPU tensors, and the pure-torch reference everywhere under
LANNER_KERNELS=reference (the oracle both are tested against)."""

from __future__ import annotations

import functools
import os

import torch

from lanner.kernels import activation, cpu_attention, cpu_linear, quant_reference, reference
from lanner.kernels import graph_inputs as graph_input_kernels
from lanner.kernels import paged_attention as attention_kernels
from lanner.kernels import qkv_prepare as qkv_kernels
from lanner.kernels import rms_norm as norm_kernels
from lanner.kernels import skinny_matmul as skinny_kernels
from lanner.kernels import token_bitmask as bitmask_kernels
from lanner.kernels import w4a16_matmul as w4a16_kernels
from lanner.kernels import w8a8_matmul as w8a8_kernels
from lanner.kernels.attention_metadata import AttentionMetadata

# Set from the environment at import; tests and benchmarks may flip it to compare paths.
FORCE_REFERENCE = os.environ.get("LANNER_KERNELS", "triton") == "reference"


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and not FORCE_REFERENCE


def use_cpu_path(x: torch.Tensor) -> bool:
    # (is_cpu, not device.type: a decode step on the CPU asks ~80 times; 0.2 against 1 µs)
    return x.is_cpu and not FORCE_REFERENCE


def unpack_graph_inputs(
    packed: torch.Tensor,
    layout: graph_input_kernels.GraphInputLayout,
    batch: int,
    seq_lens: torch.Tensor,
    prefix: torch.Tensor,
    tables: torch.Tensor,
) -> None:
    """A decode graph's int32 inputs from its packed block (kernels/graph_inputs.py)."""
    if use_triton(packed):
        unpack = graph_input_kernels.unpack_graph_inputs
    else:
        unpack = graph_input_kernels.unpack_graph_inputs_reference
    unpack(packed, layout, batch, seq_lens, prefix, tables)


def widen_block_tables(
    packed: torch.Tensor, width_offset: int, tables_offset: int, batch: int, tables: torch.Tensor
) -> None:
    """Block tables packed at a step's width, spread to ``tables``' stride (kernels/
    graph_inputs.py)."""
    if use_triton(packed):
        widen = graph_input_kernels.widen_block_tables
    else:
        widen = graph_input_kernels.widen_block_tables_reference
    widen(packed, width_offset, tables_offset, batch, tables)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): a decode step's few rows stream the weight through the
    skinny Triton kernel (cuBLAS reached ~40-90 % of copy bandwidth there); larger
    batches and the reference path take torch's GEMM; float32 and bf16 on the CPU
    multiply by packed weights (kernels/cpu_linear.py)."""
    if use_triton(x) and skinny_kernels.use_skinny(_rows(x), *weight.shape):
        return skinny_kernels.skinny_matmul(x, weight, bias)
    if use_cpu_path(x) and x.dtype == weight.dtype and x.dtype in cpu_linear.DTYPES:
        return cpu_linear.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_qmax: float,
    row_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequant(weight).T (+ bias) for an 8-bit weight [N, K] (fp8 or int8) scaled per
    channel by weight_scale [N], x quantized per token to weight's dtype (scale absmax /
    x_qmax), as the checkpoints' dynamic activation scheme says. ``row_absmax`` (float32,
    one per row of x) replaces each row's own absmax: a row-parallel rank's slice of a row
    is quantized by the whole row's (row_absmax(x) max-reduced over the ranks). On CUDA
    cards without fp8 (before sm_89) fp8 runs the reference."""
    if use_triton(x) and _has_8bit_mma(x.device, weight.dtype):
        return w8a8_kernels.w8a8_linear(x, weight, weight_scale, bias, x_qmax, row_absmax)
    return quant_reference.w8a8_linear(x, weight, weight_scale, bias, x_qmax, row_absmax=row_absmax)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row of x [..., K]: float32 [rows], exact (what w8a8_linear's
    row_absmax takes)."""
    return quant_reference.row_absmax(x)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@functools.cache
def _has_8bit_mma(device: torch.device, dtype: torch.dtype) -> bool:
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= ((8, 9) if dtype == torch.float8_e4m3fn else (8, 0))


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None,
) -> torch.Tensor:
    """x[..., perm] @ W.T (+ bias) for W in lanner's packed int4 layout
    (kernels/quant_reference.py), with its per-group scales and zero points. Decode
    batches (up to SKINNY_MAX_M rows) apply the scales exactly; larger ones use the
    weights dequantized to x's dtype, each rounded once."""
    if use_triton(x):
        return w4a16_kernels.w4a16_linear(x, packed, scales, zeros, group_size, bias, perm)
    weight_dtype = None if _rows(x) <= skinny_kernels.SKINNY_MAX_M else x.dtype
    return quant_reference.w4a16_linear(
        x, packed, scales, zeros, group_size, bias, perm, weight_dtype=weight_dtype
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return norm_kernels.rms_norm(x, weight, eps)
    if use_cpu_path(x) and x.dtype == torch.float32:
        # One fused call; in float32 the reference's arithmetic (no casts to round at).
        # torch.rms_norm, not F.rms_norm: the functional's Python checks cost more than
        # the op on a decode row.
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
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


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor, bitmask_rows: torch.Tensor
) -> None:
    """In place: row rows[i] of logits keeps only the tokens bitmask[bitmask_rows[i]] allows."""
    if use_triton(logits):
        bitmask_kernels.apply_token_bitmask(logits, bitmask, rows, bitmask_rows)
    else:
        reference.apply_token_bitmask(logits, bitmask, rows, bitmask_rows)
