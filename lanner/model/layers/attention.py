"""Paged attention layer: this step's queries attend over each sequence's paged context
(their own new K/V already written to the cache by ``ops.qkv_prepare``)."""

from __future__ import annotations

import torch
from torch import nn

from lanner.kernels import ops
from lanner.kernels.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Attention of the flat batch's queries over each sequence's paged context.

    Has no weights; the projections live in the model's attention block.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, heads, head_dim] -> [T, heads * head_dim]."""
        out = ops.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
