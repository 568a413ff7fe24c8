"""The interface every quantization method implements for a linear layer: create the
parameters it stores (in the checkpoint's layout), load checkpoint tensors into them (the
packed q/k/v or gate/up parts, and later each tensor-parallel rank's slice), post-process
them into the kernels' layout, and apply the matmul.

Sharding contract (for tensor parallelism): every parameter a method creates carries a
``ShardLayout`` saying which of its dimensions runs over the layer's output features and
which over its input features, and how many features one element there stands for (8
for an int32 word of eight 4-bit columns, the group size for per-group scales). A
column-parallel layer (q/k/v, gate/up) splits each checkpoint tensor along its output
dimension, a row-parallel one (o, down) along its input dimension; ``narrow_for_rank``
cuts one checkpoint tensor for one rank. Packed layers are sharded part by part: rank r
takes the r-th slice of q, of k and of v, and the method is created with the per-rank
sizes (``create_weights(input_size_per_rank, output_sizes_per_rank)``), so each slice
lands at its part's per-rank offset. Post-processing runs on each rank's slices alone.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from lanner.distributed import TensorParallelGroup
    from lanner.model.layers.linear import PackedLinear

Parallel = Literal["column", "row"]


@dataclass(frozen=True)
class ShardLayout:
    """How a parameter's dimensions map onto its layer's input and output features.

    ``output_dim`` runs over output features, ``output_pack`` of them per element (None: the
    tensor has no output dimension and is the same on every rank); likewise ``input_dim``
    and ``input_pack`` for input features. ``per_part`` marks a tensor with one value per
    packed part (a per-tensor scale of q, k or v): the loader writes it at the part's index,
    and every rank keeps it whole.
    """

    output_dim: int | None = None
    output_pack: int = 1
    input_dim: int | None = None
    input_pack: int = 1
    per_part: bool = False

    def split(self, parallel: Parallel) -> tuple[int | None, int]:
        """The dimension a ``parallel`` layer splits, and the features per element on it."""
        if self.per_part:
            return None, 1
        if parallel == "column":
            return self.output_dim, self.output_pack
        return self.input_dim, self.input_pack


def layer_parameter(tensor: torch.Tensor, layout: ShardLayout) -> nn.Parameter:
    """A frozen parameter that knows its ShardLayout."""
    param = nn.Parameter(tensor, requires_grad=False)
    param.shard_layout = layout  # type: ignore[attr-defined]
    return param


def shard_layout(param: torch.Tensor) -> ShardLayout:
    layout = getattr(param, "shard_layout", None)
    if layout is None:
        raise ValueError("parameter has no shard_layout; create it with layer_parameter()")
    return layout


def narrow_for_rank(
    tensor: torch.Tensor,
    layout: ShardLayout,
    parallel: Parallel,
    rank: int,
    world_size: int,
    name: str = "tensor",
) -> torch.Tensor:
    """Rank ``rank``'s slice of one checkpoint tensor (one packed part, e.g. q_proj's) of a
    ``parallel`` layer split ``world_size`` ways: the tensor itself where its layout has no
    dimension of that kind (it is replicated)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    dim, pack = layout.split(parallel)
    if dim is None or world_size == 1:
        return tensor
    size = tensor.shape[dim]
    if size % world_size:
        what = "output" if parallel == "column" else "input"
        raise ValueError(
            f"{name}: its {what} dimension holds {size} elements ({size * pack} features at "
            f"{pack} per element), which {world_size} ranks cannot split evenly; choose a "
            f"tensor_parallel_size that divides it"
        )
    step = size // world_size
    return tensor.narrow(dim, rank * step, step)


class LinearMethod(abc.ABC):
    """How one PackedLinear stores and multiplies its weight. Methods hold only their
    configuration (one object may serve many layers); tensors live on the layer."""

    name: str = "unquantized"

    @abc.abstractmethod
    def create_weights(
        self,
        layer: PackedLinear,
        input_size: int,
        output_sizes: list[int],
        dtype: torch.dtype,
    ) -> None:
        """Register on ``layer`` the parameters a checkpoint provides, in its layout, for an
        input of ``input_size`` features and packed parts of ``output_sizes`` features
        (both per rank under tensor parallelism). ``dtype`` is the model's."""

    def load_tensor(
        self, layer: PackedLinear, name: str, loaded: torch.Tensor, part: int
    ) -> str | None:
        """Copy one checkpoint tensor (``name`` of packed part ``part``) into the layer;
        returns the parameter it filled (which checkpoint_tensors lists), or None when the
        method has no such tensor. The default copies into the parameter of that name,
        narrowed to the part's span of its output dimension (or its index, per part)."""
        param = getattr(layer, name, None)
        if not isinstance(param, nn.Parameter) or not hasattr(param, "shard_layout"):
            return None
        copy_into_part(layer, param, loaded, part)
        return name

    def checkpoint_tensors(self, layer: PackedLinear) -> list[str]:
        """Names of the tensors a checkpoint must hold for every packed part."""
        return [
            name
            for name, param in layer.named_parameters(recurse=False)
            if name != "bias" and hasattr(param, "shard_layout")
        ]

    def process_weights_after_loading(self, layer: PackedLinear) -> None:  # noqa: B027
        """Turn the loaded tensors into what ``apply`` reads (repack, reorder, fold)."""

    @abc.abstractmethod
    def dummy_fill(self, layer: PackedLinear, generator: torch.Generator) -> None:
        """Random but valid checkpoint tensors (load_format="dummy"), scaled so that outputs
        keep about unit scale as the unquantized dummy weights do."""

    @abc.abstractmethod
    def apply(
        self, layer: PackedLinear, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [..., input_size] -> [..., sum(output_sizes)]."""

    def apply_row_shard(
        self, layer: PackedLinear, x: torch.Tensor, group: TensorParallelGroup
    ) -> torch.Tensor:
        """A row-parallel rank's partial product: x [..., input_size], this rank's slice of
        each input row, times its slice of the weight's columns, without the bias (the
        caller sums the ranks' partials by all-reduce, then adds it). A method that rounds
        x by a property of the whole row (a per-token activation scale) agrees on it with
        the other ranks of ``group`` here, so that every rank rounds as one rank would."""
        return self.apply(layer, x, None)

    def describe(self) -> str:
        return self.name


def copy_into_part(
    layer: PackedLinear, param: nn.Parameter, loaded: torch.Tensor, part: int
) -> None:
    """Copy ``loaded`` into packed part ``part`` of ``param`` (see ShardLayout), failing with
    both shapes when they disagree."""
    layout = shard_layout(param)
    if layout.per_part:
        target = param.data[part]
        loaded = loaded.reshape(target.shape) if loaded.numel() == 1 else loaded
    elif layout.output_dim is None:
        target = param.data
    else:
        start, size = layer.part_spans[part]
        pack = layout.output_pack
        if start % pack or size % pack:
            raise ValueError(
                f"packed part {part} spans output features [{start}, {start + size}), which "
                f"do not fall on whole elements of {pack} features"
            )
        target = param.data.narrow(layout.output_dim, start // pack, size // pack)
    if loaded.shape != target.shape:
        raise ValueError(f"expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
    target.copy_(loaded)


class UnquantizedLinearMethod(LinearMethod):
    """The model dtype's weight [out, in], multiplied by ops.linear."""

    name = "unquantized"

    def create_weights(self, layer, input_size, output_sizes, dtype):
        weight = torch.empty(sum(output_sizes), input_size, dtype=dtype)
        layer.register_parameter("weight", layer_parameter(weight, ShardLayout(0, 1, 1, 1)))

    def dummy_fill(self, layer, generator):
        bound = (3.0 / layer.weight.shape[1]) ** 0.5
        layer.weight.data.uniform_(-bound, bound, generator=generator)

    def apply(self, layer, x, bias):
        from lanner.kernels import ops

        return ops.linear(x, layer.weight, bias)


class QuantConfig(abc.ABC):
    """A checkpoint's (or the user's) quantization: which method each linear layer gets."""

    # vLLM's name of the method, as `quantization=` and quantization_config's quant_method
    # spell it.
    name: str

    @abc.abstractmethod
    def linear_method(self, prefix: str, part_names: list[str]) -> LinearMethod:
        """The method of the layer ``prefix`` (our module name) that packs the checkpoint
        modules ``part_names`` (e.g. model.layers.0.self_attn.q_proj, k_proj, v_proj).
        Parts quantized differently cannot share one packed weight: that fails."""

    def quantizes_online(self) -> bool:
        """True when the method quantizes an unquantized checkpoint while loading."""
        return False

    def describe(self) -> str:
        return self.name


def matches_module(name: str, patterns: list[str], substring: bool = False) -> bool:
    """Whether checkpoint module ``name`` is one of ``patterns``: "re:<regex>" (matched from
    the start, as compressed-tensors does), "Linear" (every linear layer), an exact name, or
    with ``substring`` any part of the name (AWQ's and GPTQ's modules_to_not_convert)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == "Linear" or pattern == name or substring and pattern in name:
            return True
    return False


def parts_skipped(prefix: str, part_names: list[str], patterns: list[str]) -> bool:
    """Whether a checkpoint leaves the parts of layer ``prefix`` unquantized (AWQ's, GPTQ's
    and hub fp8's modules_to_not_convert, matched as substrings). Parts packed into one
    weight must agree: a mix fails."""
    skipped = [matches_module(name, patterns, substring=True) for name in part_names]
    if any(skipped) and not all(skipped):
        raise ValueError(
            f"modules_to_not_convert leaves some of {part_names} unquantized but not all; "
            f"lanner packs them into one weight ({prefix}) and needs them alike"
        )
    return all(skipped)
