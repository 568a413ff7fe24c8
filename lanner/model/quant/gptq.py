"""GPTQ checkpoints (quant_method "gptq", AutoGPTQ / GPTQModel layout): 4-bit weights in
groups along the input features, symmetric or with zero points, optionally act-order.

Tensors per linear (K inputs, N outputs, G groups):
- ``qweight`` int32 [K / 8, N]: word r of column n holds rows 8r .. 8r+7, row 8r + i in
  nibble i;
- ``qzeros`` int32 [G, N / 8]: word c of group g holds columns 8c + i in nibble i. In the
  original format (checkpoint_format "gptq") the stored value is zero - 1, in GPTQModel's
  "gptq_v2" the zero itself;
- ``scales`` [G, N] (float16); ``g_idx`` int32 [K]: the group of each input row. With
  desc_act the rows were quantized in another order and g_idx is not k // group_size;
  loading sorts the rows by group once (reorder_act_order), and x is gathered to match.
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
    Int4Layout,
    Int4LinearMethod,
    Int4Weights,
    check_group_size,
    dummy_words,
    unpack_int32_words,
)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GptqLayout(Int4Layout):
    def __init__(self, zeros_minus_one: bool, desc_act: bool) -> None:
        self.zeros_minus_one = zeros_minus_one
        self.desc_act = desc_act

    def create(self, layer, input_size, output_sizes, group_size, symmetric):
        n = sum(output_sizes)
        if input_size % 8:
            raise ValueError(f"GPTQ packs 8 input rows per word; the layer has {input_size}")
        for size in output_sizes:
            if size % 8:
                raise ValueError(f"GPTQ packs zero points of 8 columns per word; a part has {size}")
        group = input_size if group_size == -1 else group_size
        groups = -(-input_size // group)
        # Act-order groups are scattered over the rows: a slice of the rows needs every
        # group's scale, so scales and zeros are not split along the inputs.
        group_dim = None if self.desc_act else 0
        layer.qweight = layer_parameter(
            torch.empty(input_size // 8, n, dtype=torch.int32),
            ShardLayout(output_dim=1, input_dim=0, input_pack=8),
        )
        layer.qzeros = layer_parameter(
            torch.empty(groups, n // 8, dtype=torch.int32),
            ShardLayout(output_dim=1, output_pack=8, input_dim=group_dim, input_pack=group),
        )
        layer.scales = layer_parameter(
            torch.empty(groups, n, dtype=torch.float16),
            ShardLayout(output_dim=1, input_dim=group_dim, input_pack=group),
        )
        layer.g_idx = layer_parameter(
            torch.empty(input_size, dtype=torch.int32), ShardLayout(input_dim=0)
        )

    def optional_tensors(self):
        # Without act order g_idx is k // group_size, and some writers leave it out.
        return () if self.desc_act else ("g_idx",)

    def load_tensor(self, layer, name, loaded, part):
        if name == "g_idx":
            # Every part of a packed layer has the same inputs; with desc_act each part
            # has its own g_idx, which must agree for the parts to share one x order.
            seen = layer.__dict__.setdefault("g_idx_parts", set())
            if self.desc_act and seen and not torch.equal(layer.g_idx.data, loaded.int()):
                raise ValueError(
                    "the packed parts of this layer have different g_idx (act orders); "
                    "lanner packs them into one weight and needs one input order"
                )
            seen.add(part)
            layer.g_idx.data.copy_(loaded)
            return name
        splits_groups = loaded.shape[0] != getattr(layer, name, loaded).shape[0]
        if name in ("scales", "qzeros") and self.desc_act and splits_groups:
            raise ValueError(
                f"{name} has {loaded.shape[0]} groups for {layer.in_features} inputs: an "
                f"act-order (desc_act) layer split along its input features across ranks "
                f"keeps groups that no reordering makes contiguous; lanner cannot run it"
            )
        if name == "scales":
            layer.scales.data = layer.scales.data.to(loaded.dtype)
        return None

    def unpack(self, layer, group_size, symmetric):
        codes = unpack_int32_words(layer.qweight.data, dim=0).T.contiguous()  # [N, K]
        zeros = unpack_int32_words(layer.qzeros.data, dim=1)  # [G, N]
        if self.zeros_minus_one:
            # The original format's zero is the stored value plus one (so 1..16): readers
            # of these checkpoints add it back without wrapping, and so does lanner.
            zeros = zeros + 1
        g_idx = layer.g_idx.data if self.desc_act else None
        return Int4Weights(codes=codes, scales=layer.scales.data, zeros=zeros, g_idx=g_idx)

    def dummy_fill(self, layer, generator, scale):
        layer.qweight.data.copy_(dummy_words(layer.qweight.shape, layer.qweight.device, generator))
        stored_zero = 7 if self.zeros_minus_one else 8
        layer.qzeros.data.fill_(
            int.from_bytes(bytes([stored_zero * 17] * 4), "little", signed=True)
        )
        layer.scales.data.fill_(scale)
        k = layer.g_idx.shape[0]
        groups = layer.scales.shape[0]
        layer.g_idx.data.copy_(torch.arange(k, device=layer.g_idx.device) * groups // k)


class GptqConfig(QuantConfig):
    """quantization_config {"quant_method": "gptq", "bits": 4, "group_size": 128,
    "desc_act": false, "sym": true, "checkpoint_format": "gptq", "lm_head": false}."""

    name = "gptq"

    def __init__(self, raw: dict[str, Any]) -> None:
        bits = raw.get("bits", 4)
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits} is not supported for gptq; use 4")
        self.group_size = int(raw.get("group_size", 128))
        check_group_size(self.group_size, "quantization_config.group_size")
        self.desc_act = bool(raw.get("desc_act", False))
        self.symmetric = bool(raw.get("sym", True))
        checkpoint_format = raw.get("checkpoint_format", "gptq")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"quantization_config.checkpoint_format={checkpoint_format!r} is not supported "
                f"for gptq; lanner loads {CHECKPOINT_FORMATS}"
            )
        self.zeros_minus_one = checkpoint_format == "gptq"
        if raw.get("dynamic"):
            raise ValueError(
                "quantization_config.dynamic (per-module GPTQ overrides) is not supported; "
                "lanner runs one bits/group_size for every layer"
            )
        self.quantize_lm_head = bool(raw.get("lm_head", False))
        self.skipped = list(raw.get("modules_to_not_convert") or [])

    def describe(self) -> str:
        order = ", act-order" if self.desc_act else ""
        zeros = "symmetric" if self.symmetric else "with zero points"
        return f"gptq (4-bit, group {self.group_size}, {zeros}{order})"

    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        if prefix == "lm_head" and not self.quantize_lm_head:
            return UnquantizedLinearMethod()
        if parts_skipped(prefix, part_names, self.skipped):
            return UnquantizedLinearMethod()
        layout = GptqLayout(self.zeros_minus_one, self.desc_act)
        return Int4LinearMethod(layout, self.group_size, self.symmetric, format_name="gptq")
