"""The tensor-parallel hook of the quantization interface, proven on the CPU: every
method's checkpoint tensors, cut in two by ``narrow_for_rank`` along what each parameter's
ShardLayout names, load into two half-size layers whose outputs recombine to the unsharded
layer's: concatenated per packed part for a column-parallel qkv_proj (q, k and v each
split), summed (the all-reduce) for a row-parallel down_proj."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lanner.model.layers.linear import PackedLinear
from lanner.model.loader import load_model
from lanner.model.quant.base import LinearMethod, narrow_for_rank, shard_layout
from tests.quant_checkpoints import QuantCheckpoints

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORLD = 2
# kind -> (family, a label); llama's qkv packs q (128 rows) with k and v of 32 each.
KINDS = {
    "ct-fp8": "fp8 per channel",
    "hf-fp8": "fp8 per tensor",
    "ct-int8": "int8",
    "ct-w4a16-g32": "int4 symmetric",
    "ct-w4a16-g64-asym": "int4 zero points",
    "autoround-sym-g32/auto-gptq": "GPTQ",
    "autoround-sym-g32/auto-awq": "AWQ",
}


def checkpoint_tensors(model_dir: Path, module: str) -> dict[str, torch.Tensor]:
    """name (without the module prefix) -> tensor, for one checkpoint module."""
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                if name.startswith(module + "."):
                    tensors[name.removeprefix(module + ".")] = handle.get_tensor(name)
    return tensors


def build_layer(
    method: LinearMethod,
    in_features: int,
    parts: dict[str | None, int],
    tensors: dict[str | None, dict[str, torch.Tensor]],
    parallel: str | None = None,
    rank: int = 0,
) -> PackedLinear:
    """A layer of ``method`` holding rank ``rank``'s share of ``tensors`` (all of them when
    ``parallel`` is None), cut by the parameters' ShardLayouts."""
    layer = PackedLinear(in_features, parts, method=method)
    layouts = {name: shard_layout(p) for name, p in layer.named_parameters()}
    for shard, named in tensors.items():
        for name, tensor in named.items():
            if parallel is not None and name in layouts:
                tensor = narrow_for_rank(tensor, layouts[name], parallel, rank, WORLD, name)
            layer.load_shard(name, tensor, shard)
    with torch.no_grad():
        layer.process_weights_after_loading()
    return layer


def method_of(model_dir: Path, name: str) -> LinearMethod:
    model = load_model(model_dir, dtype="float32", device="cpu").model
    return model.get_submodule(name).method


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS.values()))
def test_column_parallel_halves_concatenate_to_the_unsharded_qkv(
    kind: str, quant_checkpoints: QuantCheckpoints
) -> None:
    model_dir = quant_checkpoints.get("llama", kind)
    method = method_of(model_dir, "model.layers.0.self_attn.qkv_proj")
    sizes = {"q": 128, "k": 32, "v": 32}
    tensors = {
        part: checkpoint_tensors(model_dir, f"model.layers.0.self_attn.{part}_proj")
        for part in sizes
    }
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = build_layer(method, 128, sizes, tensors)(x)
        half_sizes = {part: size // WORLD for part, size in sizes.items()}
        halves = [
            build_layer(method, 128, half_sizes, tensors, "column", rank)(x)
            for rank in range(WORLD)
        ]
    # Rank r's output is [q_r, k_r, v_r]: the parts' r-th slices, in part order.
    offset, recombined = 0, []
    for part in sizes:
        width = half_sizes[part]
        recombined += [half[:, offset : offset + width] for half in halves]
        offset += width
    torch.testing.assert_close(torch.cat(recombined, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS.values()))
def test_row_parallel_halves_sum_to_the_unsharded_down_proj(
    kind: str, quant_checkpoints: QuantCheckpoints
) -> None:
    """down_proj (256 inputs) split by its input features: the ranks' outputs add up to
    the whole. W8A8 ranks quantize their own half of each activation row (its own absmax,
    as any row-parallel W8A8 engine does): the sum equals the reference of exactly that,
    and differs from the unsharded layer only by that rounding."""
    model_dir = quant_checkpoints.get("llama", kind)
    method = method_of(model_dir, "model.layers.0.mlp.down_proj")
    tensors = {None: checkpoint_tensors(model_dir, "model.layers.0.mlp.down_proj")}
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_layer = build_layer(method, 256, {None: 128}, tensors)
        full = full_layer(x)
        halves = [
            build_layer(method, 256 // WORLD, {None: 128}, tensors, "row", rank)
            for rank in range(WORLD)
        ]
        slices = x.chunk(WORLD, dim=1)
        summed = sum(half(part) for half, part in zip(halves, slices, strict=True))
        if "w4a16" in kind or "auto" in kind:
            torch.testing.assert_close(summed, full, atol=1e-5, rtol=1e-5)
            return
        # W8A8: the unsharded weight on each half of x, quantized per half.
        from lanner.kernels import quant_reference

        weight, scale = full_layer.weight, full_layer.weight_scale
        per_half = sum(
            quant_reference.w8a8_linear(
                part, weight[:, r * 128 : (r + 1) * 128], scale, None, method.x_qmax
            )
            for r, part in enumerate(slices)
        )
    torch.testing.assert_close(summed, per_half, atol=1e-5, rtol=1e-5)
    relative = ((summed - full).norm() / full.norm()).item()
    assert relative < 0.05, relative  # fp8 rounds each value by up to 2^-4 of itself


def test_act_order_cannot_split_along_inputs(quant_checkpoints: QuantCheckpoints) -> None:
    """GPTQ desc_act: the column split works (every rank keeps all of g_idx); a row split
    leaves groups that no reordering makes contiguous, which fails, saying so."""
    model_dir = quant_checkpoints.get("qwen2", "gptq-act-order")
    method = method_of(model_dir, "model.layers.0.mlp.down_proj")
    tensors = {None: checkpoint_tensors(model_dir, "model.layers.0.mlp.down_proj")}
    x = torch.randn(3, 256)
    with torch.no_grad():
        full = build_layer(method, 256, {None: 128}, tensors)(x)
        halves = [build_layer(method, 256, {None: 64}, tensors, "column", r)(x) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="act-order.*no reordering makes contiguous"):
        build_layer(method, 128, {None: 128}, tensors, "row", 0)


def test_narrow_for_rank_names_what_cannot_split() -> None:
    from lanner.model.quant.base import ShardLayout

    packed_columns = ShardLayout(output_dim=1, output_pack=8)
    with pytest.raises(ValueError, match="qweight.*3 elements.*24 features"):
        narrow_for_rank(torch.zeros(4, 3), packed_columns, "column", 0, 2, "qweight")
    replicated = narrow_for_rank(torch.arange(6), ShardLayout(per_part=True), "row", 1, 2)
    assert torch.equal(replicated, torch.arange(6))
