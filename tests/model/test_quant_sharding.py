"""The tensor-parallel hook of the quantization interface, proven on the CPU: every
method's checkpoint tensors, cut in two by ``narrow_for_rank`` along what each parameter's
ShardLayout names, load into two half-size layers whose outputs recombine to the unsharded
layer's: concatenated per packed part for a column-parallel qkv_proj (q, k and v each
split), summed (the all-reduce) for a row-parallel down_proj."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lanner.distributed import TensorParallelGroup, TensorParallelShard, host_store, join_store
from lanner.kernels import quant_reference
from lanner.model.layers.linear import PackedLinear
from lanner.model.loader import load_model
from lanner.model.quant.base import LinearMethod, narrow_for_rank, shard_layout
from lanner.model.quant.w8a8 import W8A8LinearMethod
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


def on_ranks(world: int, work: Callable[[TensorParallelGroup], object]) -> list[object]:
    """``work(group)`` on ``world`` threads, one rank each of a real gloo group; the
    results in rank order."""
    store = host_store("127.0.0.1", world)
    results: list[object] = [None] * world
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            rank_store = store if rank == 0 else join_store("127.0.0.1", store.port, world)
            shard = TensorParallelShard(rank, world)
            results[rank] = work(TensorParallelGroup(rank_store, shard, torch.device("cpu"), 30))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS.values()))
def test_row_parallel_halves_sum_to_the_unsharded_down_proj(
    kind: str, quant_checkpoints: QuantCheckpoints
) -> None:
    """down_proj (256 inputs) split by its input features: the ranks' partial products
    (apply_row_shard, over a real two-rank group) add up to the whole layer's output.
    W8A8 ranks quantize their half of each activation row by the whole row's absmax
    (max-reduced over the group): their codes are the unsharded layer's, bit for bit, so
    only the order of summing differs."""
    model_dir = quant_checkpoints.get("llama", kind)
    method = method_of(model_dir, "model.layers.0.mlp.down_proj")
    tensors = {None: checkpoint_tensors(model_dir, "model.layers.0.mlp.down_proj")}
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    x[3, 200] = 40.0  # one row's absmax in the second half: rank 0 alone would not see it
    slices = x.chunk(WORLD, dim=1)
    with torch.no_grad():
        full = build_layer(method, 256, {None: 128}, tensors)(x)
        halves = [
            build_layer(method, 256 // WORLD, {None: 128}, tensors, "row", rank)
            for rank in range(WORLD)
        ]

        def partial_product(group: TensorParallelGroup) -> torch.Tensor:
            half = halves[group.rank]
            with torch.no_grad():
                return half.method.apply_row_shard(half, slices[group.rank], group)

        summed = sum(on_ranks(WORLD, partial_product))
    torch.testing.assert_close(summed, full, atol=1e-5, rtol=1e-5)
    if isinstance(method, W8A8LinearMethod):
        # The codes each rank multiplies: its slice of the whole row's codes.
        whole_codes, _ = quant_reference.quantize_rows(x, method.weight_dtype, method.x_qmax)
        absmax = quant_reference.row_absmax(x)
        for rank, part in enumerate(slices):
            codes, _ = quant_reference.quantize_rows(
                part, method.weight_dtype, method.x_qmax, absmax
            )
            expected = whole_codes.chunk(WORLD, dim=1)[rank]
            assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


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
