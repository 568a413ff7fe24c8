"""Quantized linear layers: one method object per layer behind one interface (base.py),
chosen from config.json's quantization_config or `quantization=`."""

from __future__ import annotations

from typing import Any

from lanner.model.quant.base import QuantConfig

# quantization= names (vLLM's spelling) -> what they load.
CHECKPOINT_METHODS = ("fp8", "compressed-tensors", "awq", "gptq")
ONLINE_METHODS = ("fp8", "int8")
METHODS = ("fp8", "int8", "compressed-tensors", "awq", "gptq")
# Checkpoint-only methods given load_format="dummy" and no config: these defaults.
_DUMMY_DEFAULTS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True},
}


def _normalize(name: str) -> str:
    return str(name).lower().replace("_", "-")


def resolve_quant_config(
    model_config: dict[str, Any], quantization: str | None, dummy: bool = False
) -> QuantConfig | None:
    """The quantization of a model: its config.json's quantization_config, or
    ``quantization`` (which must then agree with it), or None for none."""
    raw = model_config.get("quantization_config")
    requested = None if quantization in (None, "", "none") else _normalize(quantization)
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {METHODS}")
    if raw is None:
        if requested is None:
            return None
        if requested in ONLINE_METHODS:
            return _build(requested, None)
        if dummy and requested in _DUMMY_DEFAULTS:
            return _build(requested, _DUMMY_DEFAULTS[requested])
        raise ValueError(
            f"quantization={quantization!r} needs a checkpoint quantized that way, but "
            f"config.json has no quantization_config; methods that quantize an unquantized "
            f"checkpoint while loading: {ONLINE_METHODS}"
        )
    if not isinstance(raw, dict) or "quant_method" not in raw:
        raise ValueError("config.json's quantization_config has no 'quant_method'")
    method = _normalize(raw["quant_method"])
    if method not in CHECKPOINT_METHODS:
        raise ValueError(
            f"config.json's quantization_config.quant_method={raw['quant_method']!r} is not "
            f"supported; lanner loads {CHECKPOINT_METHODS}"
        )
    if requested is not None and requested != method:
        raise ValueError(
            f"quantization={quantization!r}, but the checkpoint is quantized with "
            f"{raw['quant_method']!r} (config.json's quantization_config.quant_method); drop "
            f"quantization= or pass {raw['quant_method']!r}"
        )
    return _build(method, raw)


def _build(method: str, raw: dict[str, Any] | None) -> QuantConfig:
    if method == "fp8":
        from lanner.model.quant.fp8 import Fp8Config

        return Fp8Config(raw)
    if method == "int8":
        from lanner.model.quant.int8 import Int8Config

        return Int8Config()
    assert raw is not None
    if method == "awq":
        from lanner.model.quant.awq import AwqConfig

        return AwqConfig(raw)
    if method == "gptq":
        from lanner.model.quant.gptq import GptqConfig

        return GptqConfig(raw)
    from lanner.model.quant.compressed_tensors import CompressedTensorsConfig

    return CompressedTensorsConfig(raw)
