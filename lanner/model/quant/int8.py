"""int8 W8A8 quantized while loading an unquantized checkpoint (`quantization="int8"`):
per-channel int8 weights, int8 activations per token (scale absmax / 127). Checkpoints
that are already int8 load through compressed_tensors.py."""

from __future__ import annotations

import torch

from lanner.kernels.quant_reference import INT8_MAX
from lanner.model.quant.base import LinearMethod, QuantConfig, UnquantizedLinearMethod
from lanner.model.quant.w8a8 import W8A8LinearMethod


class Int8Config(QuantConfig):
    name = "int8"

    def quantizes_online(self) -> bool:
        return True

    def describe(self) -> str:
        return "int8 (online, per-channel)"

    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        if prefix == "lm_head":
            return UnquantizedLinearMethod()
        return W8A8LinearMethod(torch.int8, INT8_MAX, online=True)
