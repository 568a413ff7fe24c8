"""Linear layers whose weights may be packed from several checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn

from lanner.kernels import ops


class PackedLinear(nn.Module):
    """y = x W^T (+ b), where W stacks several checkpoint matrices along its rows.

    q/k/v projections load into one qkv weight and gate/up into one gate_up weight,
    so each becomes a single GEMM. ``shard_sizes`` names each part and its rows.
    A plain linear layer is the case of one unnamed shard.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str | None, int],
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_offsets: dict[str | None, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.out_features = offset
        # Values are filled by the weight loader (or dummy init); skip costly init here.
        self.weight = nn.Parameter(torch.empty(offset, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(offset), requires_grad=False) if bias else None

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        """Copy one checkpoint tensor into its rows of ``param`` (weight or bias)."""
        start, size = self.shard_offsets[shard_id]
        target = param.data[start : start + size]
        if loaded.shape != target.shape:
            raise ValueError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)
