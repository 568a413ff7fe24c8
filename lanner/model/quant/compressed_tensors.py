"""compressed-tensors checkpoints (quant_method "compressed-tensors", what llmcompressor
writes): each config group names its target modules and a scheme; lanner runs
- fp8 W8A8 ("float-quantized"): fp8 ``weight`` with a per-channel [N, 1] or per-tensor
  ``weight_scale``, activations dynamic per token;
- int8 W8A8 ("int-quantized"): the same in int8 (activation scale absmax / 127.5, the
  library's symmetric int8 rule);
- W4A16 ("pack-quantized"): ``weight_packed`` int32 [N, K / 8] (eight codes per word, the
  first in the lowest nibble, stored as code + 8), ``weight_scale`` [N, groups],
  ``weight_zero_point`` int32 [N / 8, groups] (asymmetric only, packed along N the same
  way), ``weight_shape`` [2] (checked), and ``weight_g_idx`` [K] for act-order groups.
"""

from __future__ import annotations

from typing import Any

import torch

from lanner.kernels.quant_reference import FP8_DTYPE, FP8_MAX
from lanner.model.quant.base import (
    LinearMethod,
    QuantConfig,
    ShardLayout,
    UnquantizedLinearMethod,
    layer_parameter,
    matches_module,
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
from lanner.model.quant.w8a8 import W8A8LinearMethod

# compressed-tensors' symmetric int8 scale: absmax / ((127 - (-128)) / 2).
CT_INT8_QMAX = 127.5
SUPPORTED = (
    "fp8 W8A8 (float-quantized: 8-bit float weights per channel or tensor, dynamic "
    "per-token 8-bit float activations), int8 W8A8 (int-quantized: the same in int), "
    "W4A16 (pack-quantized: 4-bit int weights per group or channel, no activation "
    "quantization)"
)


class CompressedTensorsLayout(Int4Layout):
    def __init__(self, act_order: bool) -> None:
        self.act_order = act_order

    def create(self, layer, input_size, output_sizes, group_size, symmetric):
        n = sum(output_sizes)
        group = input_size if group_size == -1 else group_size
        groups = -(-input_size // group)
        layer.weight_packed = layer_parameter(
            torch.empty(n, -(-input_size // 8), dtype=torch.int32),
            ShardLayout(output_dim=0, input_dim=1, input_pack=8),
        )
        layer.weight_scale = layer_parameter(
            torch.empty(n, groups, dtype=layer.scale_dtype),
            ShardLayout(output_dim=0, input_dim=1, input_pack=group),
        )
        if not symmetric:
            for size in output_sizes:
                if size % 8:
                    raise ValueError(
                        f"compressed-tensors packs zero points of 8 rows per word; a part "
                        f"has {size} rows"
                    )
            layer.weight_zero_point = layer_parameter(
                torch.empty(n // 8, groups, dtype=torch.int32),
                ShardLayout(output_dim=0, output_pack=8, input_dim=1, input_pack=group),
            )
        if self.act_order:
            layer.weight_g_idx = layer_parameter(
                torch.empty(input_size, dtype=torch.int32), ShardLayout(input_dim=0)
            )

    def load_tensor(self, layer, name, loaded, part):
        if name == "weight_shape":
            # The unsplit part's [rows, inputs]; under tensor parallelism the layer holds a
            # 1/world share of one of them, so only divisibility is checked.
            rows, inputs = loaded.tolist()
            part_rows, layer_inputs = layer.part_spans[part][1], layer.int4_input_size
            if rows % part_rows or inputs % layer_inputs:
                raise ValueError(
                    f"weight_shape says ({rows}, {inputs}), which the layer's ({part_rows}, "
                    f"{layer_inputs}) is no share of"
                )
            return name
        if name == "weight_scale":
            layer.weight_scale.data = layer.weight_scale.data.to(loaded.dtype)
        return None

    def unpack(self, layer, group_size, symmetric):
        k, n = layer.int4_input_size, layer.out_features
        codes = unpack_int32_words(layer.weight_packed.data, dim=1)[:, :k]
        zeros = None
        if not symmetric:
            zeros = unpack_int32_words(layer.weight_zero_point.data, dim=0)[:n].T
        g_idx = layer.weight_g_idx.data if self.act_order else None
        scales = layer.weight_scale.data.T
        return Int4Weights(codes=codes.contiguous(), scales=scales, zeros=zeros, g_idx=g_idx)

    def dummy_fill(self, layer, generator, scale):
        packed = layer.weight_packed
        packed.data.copy_(dummy_words(packed.shape, packed.device, generator))
        layer.weight_scale.data.fill_(scale)
        if hasattr(layer, "weight_zero_point"):
            layer.weight_zero_point.data.fill_(ZERO_EIGHT_WORD)
        if self.act_order:
            k, groups = layer.weight_g_idx.shape[0], layer.weight_scale.shape[1]
            layer.weight_g_idx.data.copy_(torch.arange(k, device=packed.device) * groups // k)


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, raw: dict[str, Any]) -> None:
        status = raw.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(
                f"quantization_config.quantization_status={status!r} is not supported; lanner "
                f"loads compressed checkpoints (llmcompressor's save_compressed=True)"
            )
        for field in ("sparsity_config", "transform_config"):
            if raw.get(field):
                raise ValueError(f"quantization_config.{field} is not supported by lanner")
        if raw.get("kv_cache_scheme"):
            raise ValueError(
                "quantization_config.kv_cache_scheme (static KV cache scales) is not "
                "supported; lanner's kv_cache_dtype='fp8' quantizes the cache with scale 1"
            )
        self.global_format = raw.get("format")
        self.ignore = list(raw.get("ignore") or [])
        self.groups: list[tuple[str, list[str], dict[str, Any]]] = []
        for group_name, group in (raw.get("config_groups") or {}).items():
            targets = list(group.get("targets") or [])
            self.groups.append((group_name, targets, group))
        if not self.groups:
            raise ValueError("quantization_config.config_groups is empty: nothing is quantized")
        # Fail at load time on any unsupported scheme, not on the first layer using it.
        self.methods = {
            name: _method_for(name, group, self.global_format) for name, _, group in self.groups
        }

    def describe(self) -> str:
        kinds = sorted({method.describe() for method in self.methods.values()})
        return "compressed-tensors: " + "; ".join(kinds)

    def scheme_of(self, module_name: str) -> str | None:
        """The config group that quantizes a checkpoint module, or None."""
        if matches_module(module_name, self.ignore):
            return None
        for group_name, targets, _ in self.groups:
            if matches_module(module_name, targets):
                return group_name
        return None

    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        schemes = {self.scheme_of(name) for name in part_names}
        if len(schemes) > 1:
            raise ValueError(
                f"config_groups/ignore quantize {part_names} differently; lanner packs them "
                f"into one weight ({prefix}) and needs them alike"
            )
        scheme = schemes.pop()
        return UnquantizedLinearMethod() if scheme is None else self.methods[scheme]


def _method_for(group_name: str, group: dict[str, Any], global_format: str | None) -> LinearMethod:
    """The method of one config group, or a ValueError naming the field lanner lacks."""
    field = f"quantization_config.config_groups.{group_name}"
    weights = group.get("weights")
    if not weights:
        raise ValueError(f"{field}.weights is missing: lanner quantizes weights")
    activations = group.get("input_activations")
    if group.get("output_activations"):
        raise ValueError(f"{field}.output_activations is not supported; {SUPPORTED}")
    fmt = group.get("format") or global_format
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy = weights.get("strategy")

    def unsupported(name: str, value: Any) -> ValueError:
        return ValueError(f"{field}.{name}={value!r} is not supported; lanner runs {SUPPORTED}")

    if bits == 8:
        if not weights.get("symmetric", True):
            raise unsupported("weights.symmetric", False)
        if strategy not in ("channel", "tensor"):
            raise unsupported("weights.strategy", strategy)
        if weights.get("dynamic"):
            raise unsupported("weights.dynamic", True)
        if activations is None:
            raise unsupported("input_activations", None)
        if (
            activations.get("num_bits") != 8
            or activations.get("type", "int") != kind
            or not activations.get("dynamic")
            or activations.get("strategy") != "token"
            or not activations.get("symmetric", True)
        ):
            raise unsupported("input_activations", activations)
        expected_format = "float-quantized" if kind == "float" else "int-quantized"
        if fmt not in (expected_format, "naive-quantized"):
            raise unsupported("format", fmt)
        if kind == "float":
            return W8A8LinearMethod(FP8_DTYPE, FP8_MAX, per_tensor=strategy == "tensor")
        return W8A8LinearMethod(torch.int8, CT_INT8_QMAX, per_tensor=strategy == "tensor")
    if bits == 4 and kind == "int":
        if activations is not None:
            raise unsupported("input_activations", activations)
        if fmt != "pack-quantized":
            raise unsupported("format", fmt)
        if strategy == "channel":
            group_size = -1
        elif strategy == "group":
            group_size = int(weights.get("group_size") or 0)
            check_group_size(group_size, f"{field}.weights.group_size")
        else:
            raise unsupported("weights.strategy", strategy)
        act_order = weights.get("actorder") == "group"
        symmetric = bool(weights.get("symmetric", True))
        layout = CompressedTensorsLayout(act_order)
        return Int4LinearMethod(layout, group_size, symmetric, format_name="compressed-tensors")
    raise unsupported("weights", {"num_bits": bits, "type": kind})
