"""fp8 W8A8 from HF-hub FP8 checkpoints (quant_method "fp8") or from an unquantized
checkpoint, quantized per channel while loading (`quantization="fp8"`).

The hub layout: fp8 e4m3 ``weight`` and its multiplier ``weight_scale_inv`` (transformers'
FineGrainedFP8 without blocks, [1, 1]) or ``weight_scale`` (AutoFP8, a scalar), one per
tensor, with ``activation_scheme: "dynamic"``; activations are quantized per token.
Block-wise scales (``weight_block_size``) are not supported.
"""

from __future__ import annotations

from typing import Any

from lanner.kernels.quant_reference import FP8_DTYPE, FP8_MAX
from lanner.model.quant.base import (
    LinearMethod,
    QuantConfig,
    UnquantizedLinearMethod,
    parts_skipped,
)
from lanner.model.quant.w8a8 import W8A8LinearMethod


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, raw: dict[str, Any] | None) -> None:
        """``raw`` is the checkpoint's quantization_config, or None to quantize online."""
        self.online = raw is None
        raw = raw or {}
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"quantization_config.activation_scheme={scheme!r} is not supported; lanner "
                f"quantizes fp8 activations dynamically per token ('dynamic')"
            )
        if raw.get("weight_block_size"):
            raise ValueError(
                f"quantization_config.weight_block_size={raw['weight_block_size']} (block-wise "
                f"fp8 scales) is not supported; lanner loads per-tensor or per-channel fp8 "
                f"scales (e.g. compressed-tensors FP8-dynamic checkpoints)"
            )
        self.skipped = list(raw.get("modules_to_not_convert") or raw.get("ignored_layers") or [])

    def quantizes_online(self) -> bool:
        return self.online

    def describe(self) -> str:
        return "fp8 (online, per-channel)" if self.online else "fp8"

    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        # The LM head stays in the model dtype (hub FP8 checkpoints leave it too).
        if prefix == "lm_head":
            return UnquantizedLinearMethod()
        if self.online:
            return W8A8LinearMethod(FP8_DTYPE, FP8_MAX, online=True)
        if parts_skipped(prefix, part_names, self.skipped):
            return UnquantizedLinearMethod()
        return Fp8CheckpointMethod()


class Fp8CheckpointMethod(W8A8LinearMethod):
    """Hub FP8 tensors: one scale per checkpoint tensor, spelled ``weight_scale`` (AutoFP8)
    or ``weight_scale_inv`` (transformers), both the dequantization multiplier."""

    def __init__(self) -> None:
        super().__init__(FP8_DTYPE, FP8_MAX, scale_name="weight_scale", per_tensor=True)

    def load_tensor(self, layer, name, loaded, part):
        if name == "weight_scale_inv":
            name = "weight_scale"
        if name == "weight_scale" and loaded.numel() != 1:
            raise ValueError(
                f"expected one scale per tensor, got shape {tuple(loaded.shape)} (quant_method "
                f"fp8 per-channel or block-wise scales are not supported; per-channel fp8 loads "
                f"from compressed-tensors checkpoints)"
            )
        return super().load_tensor(layer, name, loaded, part)
