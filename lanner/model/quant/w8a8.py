"""The W8A8 linear method (fp8 e4m3 or int8): 8-bit weights with one scale per output
channel, activations quantized per token at run time (dynamic, absmax / qmax).

Checkpoint layouts it loads: ``weight`` [out, in] in fp8/int8 with ``weight_scale`` (or
HF's ``weight_scale_inv``, the same multiplier) per channel ([out] or [out, 1]) or per
tensor (one per packed part, widened to per channel after loading, which is exact); or, for
online quantization, ``weight`` in the model dtype, quantized per channel after loading.

Tensor parallelism: a column-parallel rank sees whole rows and quantizes them as one rank
does; a row-parallel rank (o_proj, down_proj) holds a slice of each row, and quantizes it
by the whole row's absmax, max-reduced over the ranks, so every tensor_parallel_size
rounds the activations alike (only the all-reduce's order of summing the outputs differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lanner.kernels import ops
from lanner.kernels.quant_reference import FP8_DTYPE, FP8_MAX, INT8_MAX
from lanner.model.quant.base import LinearMethod, ShardLayout, layer_parameter

WEIGHT_LAYOUT = ShardLayout(output_dim=0, input_dim=1)
CHANNEL_SCALE_LAYOUT = ShardLayout(output_dim=0)
PART_SCALE_LAYOUT = ShardLayout(per_part=True)


@dataclass(frozen=True)
class W8A8LinearMethod(LinearMethod):
    """``weight_dtype`` is torch.float8_e4m3fn or torch.int8. ``x_qmax``: activations are
    scaled by absmax / x_qmax per token (448 for fp8; 127, or compressed-tensors' 127.5, for
    int8). ``scale_name`` is the checkpoint's name of the weight scale; ``per_tensor``: one
    scale per checkpoint tensor rather than per channel; ``online``: the checkpoint holds
    unquantized weights, quantized here after loading."""

    weight_dtype: torch.dtype = FP8_DTYPE
    x_qmax: float = FP8_MAX
    scale_name: str = "weight_scale"
    per_tensor: bool = False
    online: bool = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "fp8" if self.weight_dtype == FP8_DTYPE else "int8"

    def describe(self) -> str:
        scales = "per-tensor" if self.per_tensor else "per-channel"
        source = "online from the checkpoint's weights" if self.online else "checkpoint"
        return f"{self.name} W8A8 ({scales} weight scales, {source}, dynamic per-token activations)"

    def create_weights(self, layer, input_size, output_sizes, dtype):
        rows = sum(output_sizes)
        weight_dtype = dtype if self.online else self.weight_dtype
        weight = torch.empty(rows, input_size, dtype=weight_dtype)
        layer.register_parameter("weight", layer_parameter(weight, WEIGHT_LAYOUT))
        if self.online:
            return
        if self.per_tensor:
            scale = layer_parameter(
                torch.empty(len(output_sizes), dtype=torch.float32), PART_SCALE_LAYOUT
            )
        else:
            scale = layer_parameter(torch.empty(rows, dtype=torch.float32), CHANNEL_SCALE_LAYOUT)
        layer.register_parameter(self.scale_name, scale)

    def load_tensor(self, layer, name, loaded, part):
        if name == self.scale_name and not self.per_tensor and loaded.dim() == 2:
            if loaded.shape[1] != 1:
                raise ValueError(
                    f"expected a per-channel scale of shape ({loaded.shape[0]}, 1), got "
                    f"{tuple(loaded.shape)}: the checkpoint's scales are not per channel, "
                    f"as its quantization_config says"
                )
            loaded = loaded[:, 0]
        if name == "weight" and not self.online and loaded.dtype != self.weight_dtype:
            raise ValueError(f"expected {self.weight_dtype} weights, got {loaded.dtype}")
        return super().load_tensor(layer, name, loaded, part)

    def process_weights_after_loading(self, layer):
        if self.online:
            codes, scale = quantize_per_channel(layer.weight.data, self.weight_dtype)
        else:
            codes, scale = layer.weight.data, getattr(layer, self.scale_name).data
            if self.per_tensor:
                sizes = [size for _, size in layer.part_spans]
                scale = torch.repeat_interleave(scale, torch.tensor(sizes, device=scale.device))
            delattr(layer, self.scale_name)
        layer.weight = layer_parameter(codes, WEIGHT_LAYOUT)
        layer.weight_scale = layer_parameter(scale.float().contiguous(), CHANNEL_SCALE_LAYOUT)

    def dummy_fill(self, layer, generator):
        k = layer.weight.shape[1]
        bound = (3.0 / k) ** 0.5
        if self.online:
            layer.weight.data.uniform_(-bound, bound, generator=generator)
            return
        qmax = FP8_MAX if self.weight_dtype == FP8_DTYPE else INT8_MAX
        values = torch.empty(layer.weight.shape, device=layer.weight.device)
        values.uniform_(-qmax, qmax, generator=generator)
        if self.weight_dtype == torch.int8:
            values = values.round()
        layer.weight.data.copy_(values.to(self.weight_dtype))
        getattr(layer, self.scale_name).data.fill_(bound / qmax)

    def apply(self, layer, x, bias):
        return ops.w8a8_linear(x, layer.weight, layer.weight_scale, bias, self.x_qmax)

    def apply_row_shard(self, layer, x, group):
        # The per-token scale is the whole row's absmax: the max of the ranks' slices'
        # absmax (exact), one collective of a float a row. Every rank then rounds its
        # slice exactly as one rank rounds the whole row.
        absmax = group.all_reduce_max(ops.row_absmax(x))
        return ops.w8a8_linear(x, layer.weight, layer.weight_scale, None, self.x_qmax, absmax)


def quantize_per_channel(
    weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of an [out, in] weight: scale absmax / qmax
    (float32), codes rounded to nearest (fp8: even, saturating; int8: half to even)."""
    from lanner.kernels.quant_reference import quantize_rows

    qmax = FP8_MAX if dtype == FP8_DTYPE else INT8_MAX
    # Row by row in chunks: a float32 copy of a whole 8B gate_up would be 470 MB.
    codes = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = 4096
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        codes[rows], scales[rows] = quantize_rows(weight[rows], dtype, qmax)
    return codes, scales
