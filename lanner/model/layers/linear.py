"""Linear layers whose weights may be packed from several checkpoint tensors, stored and
multiplied by a quantization method (lanner/model/quant)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from lanner.model.quant.base import (
    LinearMethod,
    ShardLayout,
    UnquantizedLinearMethod,
    copy_into_part,
    layer_parameter,
)

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
