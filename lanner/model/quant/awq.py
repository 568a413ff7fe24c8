"""AWQ checkpoints (quant_method "awq", AutoAWQ's GEMM layout): 4-bit weights with zero
points, groups along the input features.

Tensors per linear (K inputs, N outputs, G = K / group_size groups):
- ``qweight`` int32 [K, N / 8]: word c of row k holds columns 8c .. 8c+7, column 8c + j in
  nibble AWQ_NIBBLE_OF_COLUMN[j] (AutoAWQ packs in the order 0, 2, 4, 6, 1, 3, 5, 7);
- ``qzeros`` int32 [G, N / 8], packed the same way; ``scales`` [G, N] (float16).
Real weight: (q - zero) * scale.
"""

from __future__ import annotations

from typing import Any

import torch

from lanner.model.quant.base import (
    LinearMethod,
    QuantConfig,
    ShardLayout,
    UnquantizedLinearMethod,
    layer_parameter,
    parts_skipped,
)
from lanner.model.quant.int4 import (
    ZERO_EIGHT_WORD,
    Int4Layout,
    Int4LinearMethod,
    Int4Weights,
    check_group_size,
    dummy_words,
    unpack_int32_words,
)

# AutoAWQ writes column j of each group of eight into nibble ORDER.index(j).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, N / 8] in AWQ's column order -> uint8 codes [rows, N]."""
    nibbles = unpack_int32_words(words, dim=1).view(words.shape[0], -1, 8)
    order = torch.tensor(AWQ_NIBBLE_OF_COLUMN, device=words.device)
    return nibbles[:, :, order].reshape(words.shape[0], -1)


class AwqLayout(Int4Layout):
    def __init__(self, symmetric: bool) -> None:
        self.symmetric = symmetric

    def create(self, layer, input_size, output_sizes, group_size, symmetric):
        n = sum(output_sizes)
        groups = -(-input_size // group_size)
        for size in output_sizes:
            if size % 8:
                raise ValueError(f"AWQ packs 8 output columns per word; a part has {size}")
        layer.qweight = layer_parameter(
            torch.empty(input_size, n // 8, dtype=torch.int32),
            ShardLayout(output_dim=1, output_pack=8, input_dim=0),
        )
        # Symmetric checkpoints may leave qzeros out: it then reads as all 8.
        layer.qzeros = layer_parameter(
            torch.full((groups, n // 8), ZERO_EIGHT_WORD, dtype=torch.int32),
            ShardLayout(output_dim=1, output_pack=8, input_dim=0, input_pack=group_size),
        )
        layer.scales = layer_parameter(
            torch.empty(groups, n, dtype=torch.float16),
            ShardLayout(output_dim=1, input_dim=0, input_pack=group_size),
        )

    def optional_tensors(self):
        return ("qzeros",) if self.symmetric else ()

    def load_tensor(self, layer, name, loaded, part):
        if name == "scales":
            # Scales come in the checkpoint's 16-bit dtype; keep it (see Int4LinearMethod).
            layer.scales.data = layer.scales.data.to(loaded.dtype)
        return None

    def unpack(self, layer, group_size, symmetric):
        codes = unpack_awq(layer.qweight.data).T.contiguous()  # [N, K]
        zeros = unpack_awq(layer.qzeros.data)  # [G, N]
        return Int4Weights(codes=codes, scales=layer.scales.data, zeros=zeros)

    def dummy_fill(self, layer, generator, scale):
        layer.qweight.data.copy_(dummy_words(layer.qweight.shape, layer.qweight.device, generator))
        layer.qzeros.data.fill_(ZERO_EIGHT_WORD)
        layer.scales.data.fill_(scale)


class AwqConfig(QuantConfig):
    """quantization_config {"quant_method": "awq", "bits": 4, "group_size": 128,
    "zero_point": true, "version": "gemm", "modules_to_not_convert": [...]}."""

    name = "awq"

    def __init__(self, raw: dict[str, Any]) -> None:
        bits = raw.get("bits", raw.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits} is not supported for awq; use 4")
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"quantization_config.version={version!r} is not supported for awq; lanner "
                f"loads AutoAWQ's 'gemm' layout"
            )
        self.group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
        check_group_size(self.group_size, "quantization_config.group_size")
        if self.group_size == -1:
            raise ValueError("quantization_config.group_size=-1 is not an AWQ layout")
        # zero_point=false: symmetric, its qzeros (if written at all) all 8.
        self.zero_point = bool(raw.get("zero_point", True))
        self.skipped = list(raw.get("modules_to_not_convert") or [])

    def describe(self) -> str:
        zeros = "with zero points" if self.zero_point else "symmetric"
        return f"awq (4-bit, group {self.group_size}, {zeros})"

    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        if parts_skipped(prefix, part_names, self.skipped) or prefix == "lm_head":
            return UnquantizedLinearMethod()
        return Int4LinearMethod(
            AwqLayout(not self.zero_point),
            self.group_size,
            symmetric=not self.zero_point,
            format_name="awq",
        )
