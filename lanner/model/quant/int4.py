"""The W4A16 linear method: 4-bit weights in groups of ``group_size`` input features, each
group with a scale (and, asymmetric, a zero point) per output channel; activations stay in
the model dtype. Checkpoints in AWQ's, GPTQ's and compressed-tensors' layouts (a
``Int4Layout`` each, in awq.py, gptq.py and compressed_tensors.py) are unpacked after
loading to codes, scales and zeros, act-order reordered, and repacked into lanner's plane
layout (kernels/quant_reference.py), which one set of kernels reads.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from lanner.kernels import ops
from lanner.kernels.quant_reference import INT4_PLANE, INT4_SYMMETRIC_ZERO, pack_int4
from lanner.model.quant.base import LinearMethod, ShardLayout, layer_parameter

# Group sizes the kernels take: those dividing one nibble plane of 128 k, and multiples of it.
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, "a multiple of 128", -1)


def check_group_size(group_size: int, field: str) -> None:
    """Fail, naming the config field, for a group size the kernels cannot take."""
    ok = group_size == -1 or (
        group_size > 0
        and group_size % 16 == 0
        and (INT4_PLANE % group_size == 0 or group_size % INT4_PLANE == 0)
    )
    if not ok:
        raise ValueError(
            f"{field}={group_size} is not supported; int4 group sizes lanner runs: 16, 32, 64, "
            f"128 or a multiple of 128, or -1 (one group per output channel)"
        )


@dataclass
class Int4Weights:
    """A layer's weights unpacked from any checkpoint layout: codes [N, K] (uint8 0..15),
    scales [groups, N], zeros [groups, N] (uint8 codes) or None for zero 8, and g_idx [K]
    (the group of every input feature) when the checkpoint has one."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None = None


class Int4Layout(abc.ABC):
    """One checkpoint format's tensors of a 4-bit layer."""

    @abc.abstractmethod
    def create(
        self, layer, input_size: int, output_sizes: list[int], group_size: int, symmetric: bool
    ) -> None:
        """Register the checkpoint-layout parameters on ``layer``."""

    @abc.abstractmethod
    def unpack(self, layer, group_size: int, symmetric: bool) -> Int4Weights:
        """The loaded parameters as codes, scales and zeros (and g_idx)."""

    def load_tensor(self, layer, name: str, loaded: torch.Tensor, part: int) -> str | None:
        """Handle a tensor the generic copy cannot (returning the parameter it filled), or
        return None to leave it to the generic copy."""
        return None

    def optional_tensors(self) -> tuple[str, ...]:
        """Parameters a checkpoint may leave out."""
        return ()

    @abc.abstractmethod
    def dummy_fill(self, layer, generator: torch.Generator, scale: float) -> None:
        """Random codes, zero points 8 and scales around ``scale``."""


@dataclass(frozen=True)
class Int4LinearMethod(LinearMethod):
    """W4A16 over one checkpoint layout. ``group_size`` -1 means one group per output
    channel; ``symmetric``: no zero points stored (zero = 8 on the unsigned code)."""

    layout: Int4Layout
    group_size: int = 128
    symmetric: bool = True
    format_name: str = "int4"

    name = "int4"

    def describe(self) -> str:
        zeros = "symmetric" if self.symmetric else "with zero points"
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.format_name} W4A16 ({group}, {zeros})"

    def groups(self, input_size: int) -> int:
        return 1 if self.group_size == -1 else -(-input_size // self.group_size)

    def effective_group(self, input_size: int) -> int:
        """Per-channel is one group spanning K padded to whole planes of 128."""
        if self.group_size == -1:
            return -(-input_size // INT4_PLANE) * INT4_PLANE
        return self.group_size

    def create_weights(self, layer, input_size, output_sizes, dtype):
        layer.int4_input_size = input_size
        layer.scale_dtype = dtype
        self.layout.create(layer, input_size, output_sizes, self.group_size, self.symmetric)

    def load_tensor(self, layer, name, loaded, part):
        filled = self.layout.load_tensor(layer, name, loaded, part)
        if filled is not None:
            return filled
        return super().load_tensor(layer, name, loaded, part)

    def checkpoint_tensors(self, layer):
        optional = self.layout.optional_tensors()
        return [name for name in super().checkpoint_tensors(layer) if name not in optional]

    def process_weights_after_loading(self, layer):
        k = layer.int4_input_size
        weights = self.layout.unpack(layer, self.group_size, self.symmetric)
        n = layer.out_features
        groups = self.groups(k)
        if weights.codes.shape != (n, k) or weights.scales.shape != (groups, n):
            raise AssertionError(
                f"unpacked codes {tuple(weights.codes.shape)} / scales "
                f"{tuple(weights.scales.shape)}, expected ({n}, {k}) / ({groups}, {n})"
            )
        perm = None
        if weights.g_idx is not None:
            weights.codes, perm = reorder_act_order(
                weights.codes, weights.g_idx, self.effective_group(k)
            )
        zeros = weights.zeros
        if zeros is not None and self.symmetric:
            if not bool((zeros == INT4_SYMMETRIC_ZERO).all()):
                raise ValueError(
                    "the quantization_config says symmetric (sym=true), but the checkpoint's "
                    "zero points are not all 8"
                )
            zeros = None
        for name, _ in list(layer.named_parameters(recurse=False)):
            if name != "bias":
                delattr(layer, name)
        layer.qweight = layer_parameter(pack_int4(weights.codes), ShardLayout(output_dim=0))
        # Scales keep the checkpoint's dtype where it is a 16-bit one (fp16 scales converted
        # to bf16 would lose three bits); float32 ones become the model dtype.
        scale_dtype = weights.scales.dtype
        if scale_dtype not in (torch.float16, torch.bfloat16):
            scale_dtype = layer.scale_dtype
        layer.scales = layer_parameter(
            weights.scales.to(scale_dtype).contiguous(), ShardLayout(output_dim=1)
        )
        layer.zeros = (
            None
            if zeros is None
            else layer_parameter(zeros.to(torch.uint8).contiguous(), ShardLayout(output_dim=1))
        )
        layer.perm = None if perm is None else layer_parameter(perm, ShardLayout())

    def dummy_fill(self, layer, generator):
        # (q - 8) of uniform codes has standard deviation ~4.6; unquantized dummy weights
        # are uniform in +-sqrt(3 / K), standard deviation 1 / sqrt(K).
        self.layout.dummy_fill(layer, generator, 1.0 / (4.6 * layer.int4_input_size**0.5))

    def apply(self, layer, x, bias):
        return ops.w4a16_linear(
            x,
            layer.qweight,
            layer.scales,
            layer.zeros,
            self.effective_group(layer.int4_input_size),
            bias,
            layer.perm,
        )


def reorder_act_order(
    codes: torch.Tensor, g_idx: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Act-order (GPTQ desc_act) checkpoints give each input feature k its group g_idx[k]
    in any order. Sorting the features by group makes the groups contiguous again: the
    codes' columns are permuted once here, and the kernels read x[..., perm]. Returns the
    codes and perm (None when g_idx is already in order)."""
    k = codes.shape[1]
    g_idx = g_idx.to(torch.int64)
    in_order = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx, in_order):
        return codes, None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], in_order):
        raise ValueError(
            f"g_idx does not give every group exactly {group_size} input features, so no "
            f"reordering makes the groups contiguous (an act-order layer split along its "
            f"input features across ranks is one such case); lanner cannot run it"
        )
    return codes[:, perm].contiguous(), perm.to(torch.int32)


def unpack_int32_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit codes per int32, least significant nibble first, spread along ``dim``
    (an [a, b] tensor packed along dim 1 becomes [a, 8 b]). Returns uint8."""
    values = words.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int64)
    codes = (values.unsqueeze(-1) >> shifts) & 0xF  # [a, b, 8]
    if dim == 1:
        return codes.reshape(words.shape[0], -1).to(torch.uint8)
    return codes.permute(0, 2, 1).reshape(-1, words.shape[1]).to(torch.uint8)


def dummy_words(shape: tuple[int, ...], device, generator: torch.Generator) -> torch.Tensor:
    """Random int32 words: eight uniform 4-bit codes each."""
    return torch.randint(
        -(1 << 31), (1 << 31) - 1, shape, dtype=torch.int32, device=device, generator=generator
    )


ZERO_EIGHT_WORD = -0x77777778  # 0x88888888 as int32: eight zero points of 8
