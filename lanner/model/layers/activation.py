"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from lanner.kernels import ops


class SiluAndMul(nn.Module):
    """silu(gate) * up on a [..., 2 * d] input holding gate then up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
