"""Linear layers whose weights may be packed from several checkpoint tensors, stored and
multiplied by a quantization method (lanner/model/quant), and their tensor-parallel forms:
column-parallel (each rank holds a slice of every packed part's output features) and
row-parallel (a slice of the input features, partial outputs summed by one all-reduce)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lanner.model.quant.base import (
    LinearMethod,
    Parallel,
    ShardLayout,
    UnquantizedLinearMethod,
    copy_into_part,
    layer_parameter,
    narrow_for_rank,
    shard_layout,
)

if TYPE_CHECKING:
    from lanner.distributed import TensorParallelGroup, TensorParallelShard

# Set while the loader builds a model: layers then wait for their method (which depends
# on their name, known only once the model is built) instead of allocating a weight.
_DEFERRED = contextvars.ContextVar("lanner_deferred_linear_weights", default=False)


@contextlib.contextmanager
def deferred_linear_weights() -> Iterator[None]:
    """PackedLinear layers built inside allocate nothing until ``set_method``."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class PackedLinear(nn.Module):
    """y = x W^T (+ b), where W stacks several checkpoint matrices along its rows.

    q/k/v projections load into one qkv weight and gate/up into one gate_up weight,
    so each becomes a single GEMM. ``shard_sizes`` names each part and its rows (output
    features). A plain linear layer is the case of one unnamed shard. How W is stored and
    multiplied is its ``method``'s business (a LinearMethod: unquantized, fp8, int4, ...).
    """

    # Tensor parallelism (set by column_parallel / RowParallelLinear; None: the layer is
    # whole). Per packed part, the slice of the checkpoint tensor this rank holds:
    # (slice index, number of slices), e.g. (rank, world_size).
    parallel: Parallel | None = None
    part_slices: list[tuple[int, int]] | None = None
    # The unsplit layer's input features and parts, as the checkpoint stores them.
    checkpoint_in_features: int | None = None
    checkpoint_shard_sizes: dict[str | None, int] | None = None

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str | None, int],
        bias: bool = False,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_offsets: dict[str | None, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.part_index = {shard_id: i for i, shard_id in enumerate(self.shard_offsets)}
        self.part_spans = list(self.shard_offsets.values())
        self.out_features = offset
        # Values are filled by the weight loader (or dummy init); skip costly init here.
        self.bias = (
            layer_parameter(torch.empty(offset), ShardLayout(output_dim=0)) if bias else None
        )
        self.method: LinearMethod | None = None
        if method is not None or not _DEFERRED.get():
            self.set_method(method or UnquantizedLinearMethod())

    def set_method(self, method: LinearMethod, dtype: torch.dtype | None = None) -> None:
        """Give the layer its method, which registers the (empty) parameters it loads."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        self.method = method
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.get_default_dtype())
        method.create_weights(self, self.in_features, [s for _, s in self.part_spans], dtype)

    def load_shard(self, name: str, loaded: torch.Tensor, shard_id: str | None) -> str | None:
        """Copy one checkpoint tensor (``name`` of packed part ``shard_id``) into the layer;
        returns the parameter it filled, or None when the layer has no such tensor."""
        part = self.part_index[shard_id]
        if name == "bias" and self.bias is not None:
            copy_into_part(self, self.bias, loaded, part)
            return name
        return self._method().load_tensor(self, name, loaded, part)

    def rank_slice(self, name: str, tensor: Any, shard_id: str | None) -> torch.Tensor:
        """This rank's slice of checkpoint tensor ``name`` of packed part ``shard_id`` (the
        whole tensor when the layer is not split, or the tensor is replicated). ``tensor``
        may be a lazy checkpoint slice (loader.CheckpointTensor): only the slice is read."""
        param = getattr(self, name, None)
        if self.parallel is None or not hasattr(param, "shard_layout"):
            return materialize(tensor)
        assert self.part_slices is not None
        index, count = self.part_slices[self.part_index[shard_id]]
        return materialize(
            narrow_for_rank(tensor, shard_layout(param), self.parallel, index, count, name)
        )

    def checkpoint_twin(self) -> PackedLinear:
        """A whole (unsplit) layer of this one's method, in the checkpoint's shape: random
        weights for a split layer are drawn whole, as the unsplit model draws them, and
        cut like a checkpoint, so every tensor_parallel_size runs the same model."""
        assert self.checkpoint_in_features is not None and self.checkpoint_shard_sizes
        return PackedLinear(
            self.checkpoint_in_features,
            self.checkpoint_shard_sizes,
            bias=self.bias is not None,
            method=self._method(),
        )

    def checkpoint_tensors(self) -> list[str]:
        """The parameter names a checkpoint provides for every packed part."""
        names = self._method().checkpoint_tensors(self)
        return [*names, "bias"] if self.bias is not None else names

    def process_weights_after_loading(self) -> None:
        self._method().process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._method().apply(self, x, self.bias)

    def extra_repr(self) -> str:
        method = self.method.describe() if self.method is not None else "no method yet"
        return f"in={self.in_features}, parts={dict(self.shard_offsets)}, {method}"

    def _method(self) -> LinearMethod:
        if self.method is None:
            raise RuntimeError("PackedLinear has no method yet: the loader calls set_method")
        return self.method


class RowParallelLinear(PackedLinear):
    """A linear layer whose input features are split over the tensor-parallel ranks: each
    rank multiplies its slice of the input by its slice of the weight's columns, and one
    all-reduce sums the partial outputs (the bias, kept whole, is added once after it)."""

    parallel: Parallel | None = "row"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        shard: TensorParallelShard,
        group: TensorParallelGroup | None,
    ) -> None:
        if in_features % shard.world_size:
            raise ValueError(
                f"a row-parallel layer's {in_features} input features cannot be split "
                f"evenly over tensor_parallel_size={shard.world_size}"
            )
        super().__init__(in_features // shard.world_size, {None: out_features}, bias=bias)
        self.group = group
        self.part_slices = [(shard.rank, shard.world_size)]
        self.checkpoint_in_features = in_features
        self.checkpoint_shard_sizes = {None: out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("this model was loaded without its tensor-parallel group")
        out = self._method().apply_row_shard(self, x, self.group)
        self.group.all_reduce(out)
        return out if self.bias is None else out.add_(self.bias)


def column_parallel(
    in_features: int,
    shard_sizes: dict[str | None, int],
    bias: bool,
    shard: TensorParallelShard,
    part_slices: list[tuple[int, int]] | None = None,
) -> PackedLinear:
    """A PackedLinear holding this rank's slice of every part's output features: part i
    keeps slice ``part_slices[i]`` = (index, count) of its rows, by default (rank,
    world_size). ``shard_sizes`` are the whole parts' sizes. Whole when world_size is 1."""
    if shard.world_size == 1:
        return PackedLinear(in_features, shard_sizes, bias=bias)
    slices = part_slices or [(shard.rank, shard.world_size)] * len(shard_sizes)
    per_rank = {}
    for (part, size), (_, count) in zip(shard_sizes.items(), slices, strict=True):
        if size % count:
            raise ValueError(
                f"a column-parallel part ({part or 'the weight'}) of {size} output features "
                f"cannot be split {count} ways (tensor_parallel_size={shard.world_size})"
            )
        per_rank[part] = size // count
    layer = PackedLinear(in_features, per_rank, bias=bias)
    layer.parallel = "column"
    layer.part_slices = slices
    layer.checkpoint_in_features = in_features
    layer.checkpoint_shard_sizes = dict(shard_sizes)
    return layer


def row_parallel(
    in_features: int,
    out_features: int,
    bias: bool,
    shard: TensorParallelShard,
    group: TensorParallelGroup | None,
) -> PackedLinear:
    """A row-parallel layer, or the whole PackedLinear when world_size is 1."""
    if shard.world_size == 1:
        return PackedLinear(in_features, {None: out_features}, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, shard, group)


def part_tensor(layer: PackedLinear, param: nn.Parameter, part: int) -> torch.Tensor:
    """Packed part ``part`` of ``param`` as a checkpoint stores it (what copy_into_part
    copied there)."""
    layout = shard_layout(param)
    if layout.per_part:
        return param.data[part]
    if layout.output_dim is None:
        return param.data
    start, size = layer.part_spans[part]
    pack = layout.output_pack
    return param.data.narrow(layout.output_dim, start // pack, size // pack)


def materialize(tensor: Any) -> torch.Tensor:
    """A tensor, reading a lazy checkpoint slice whole when it is one."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.read()
