"""Rotary position embedding with the default, linear and llama3 frequency rules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lanner.model.config import RopeConfig


def rope_inverse_frequencies(
    head_dim: int, rope: RopeConfig, max_position_embeddings: int
) -> torch.Tensor:
    """The per-pair rotation speeds [head_dim / 2] in float32, after scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band
        # between is interpolated smoothly (Llama 3.1's context extension).
        old_context = rope.original_max_position_embeddings or max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Holds the float32 [max_positions, head_dim] cos|sin table that ``ops.qkv_prepare``
    rotates q and k with."""

    def __init__(self, head_dim: int, rope: RopeConfig, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, rope, max_position_embeddings)
        positions = torch.arange(max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.to(positions.device))
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", table, persistent=False)
