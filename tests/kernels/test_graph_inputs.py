"""A decode graph's packed inputs unpacked by the kernel (Triton's CPU interpreter)
against its torch reference and against what was staged: each row's context length, the
prefix length and the block tables at the captured stride, with entries past the step's
width left as they were."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels.graph_inputs import (  # noqa: E402
    GraphInputLayout,
    unpack_graph_inputs,
    unpack_graph_inputs_reference,
    widen_block_tables,
    widen_block_tables_reference,
)
from lanner.runner.cuda_graphs import stage_inputs  # noqa: E402


def staged_step(seed: int, layout: GraphInputLayout):
    """A random step of ``count`` rows staged into a packed block with stale entries."""
    rng = random.Random(seed)
    count = rng.randint(1, layout.max_batch)
    batch = rng.randint(count, layout.max_batch)
    tables = [
        [rng.randrange(10_000) for _ in range(rng.randint(1, layout.max_blocks))]
        for _ in range(count)
    ]
    seq_lens = [rng.randint(1, 16 * len(t)) for t in tables]
    packed = np.full(layout.size, 123_456, dtype=np.int64)  # stale from an earlier step
    used = stage_inputs(
        packed,
        layout,
        batch,
        [rng.randrange(5000) for _ in range(count)],
        [n - 1 for n in seq_lens],
        [rng.randrange(1 << 20) for _ in range(count)],
        seq_lens,
        tables,
        rng.choice([0, 16, 48]),
    )
    return torch.from_numpy(packed), used, batch, tables, seq_lens


def outputs(layout: GraphInputLayout):
    """Poisoned output tensors."""
    return (
        torch.full((layout.max_batch,), -7, dtype=torch.int32),
        torch.full((1,), -7, dtype=torch.int32),
        torch.full((layout.max_batch, layout.max_blocks), -7, dtype=torch.int32),
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (8, 300), (33, 17)])
def test_kernel_matches_reference_and_the_staged_step(seed: int, shape) -> None:
    layout = GraphInputLayout(*shape)
    packed, used, batch, tables, seq_lens = staged_step(seed, layout)
    assert used == layout.tables + len(tables) * max(len(t) for t in tables)
    kernel_out, reference_out = outputs(layout), outputs(layout)
    unpack_graph_inputs(packed, layout, batch, *kernel_out)
    unpack_graph_inputs_reference(packed, layout, batch, *reference_out)
    width = max(len(t) for t in tables)
    for got, want in zip(kernel_out, reference_out, strict=True):
        assert torch.equal(got, want)
    out_lens, out_prefix, out_tables = kernel_out
    count = len(tables)
    assert out_lens[:count].tolist() == seq_lens
    assert (out_lens[count:batch] == 0).all()  # padding rows attend to nothing
    assert (out_lens[batch:] == -7).all()  # rows past the graph's batch are not touched
    assert out_prefix.item() == int(packed[layout.prefix])
    for row, table in enumerate(tables):
        assert out_tables[row, : len(table)].tolist() == table
    assert (out_tables[:, width:] == -7).all()  # past the step's width: left as it was
    assert (out_tables[batch:] == -7).all()


def test_layout_fields_start_16_byte_aligned() -> None:
    for max_batch in (1, 7, 20, 256):
        layout = GraphInputLayout(max_batch, 5)
        starts = [layout.positions, layout.slots, layout.seq_lens, layout.tables]
        assert all(start * 8 % 16 == 0 for start in starts)
        assert layout.positions >= max_batch and layout.size == layout.tables + max_batch * 5


@pytest.mark.parametrize("seed", range(4))
def test_widen_block_tables_alone(seed: int) -> None:
    """The draft chain's use: only the tables, from any offsets; nothing else written."""
    rng = random.Random(seed)
    batch, max_blocks = rng.randint(1, 9), rng.randint(1, 300)
    width = rng.randint(1, max_blocks)
    width_at, tables_at = 4, 6
    packed = torch.randint(0, 1 << 20, (tables_at + batch * width + 5,), dtype=torch.int64)
    packed[width_at] = width
    got = torch.full((batch + 2, max_blocks), -7, dtype=torch.int32)
    want = got.clone()
    widen_block_tables(packed, width_at, tables_at, batch, got)
    widen_block_tables_reference(packed, width_at, tables_at, batch, want)
    assert torch.equal(got, want)
    rows = packed[tables_at : tables_at + batch * width].view(batch, width)
    assert torch.equal(got[:batch, :width], rows.to(torch.int32))
    assert (got[:, width:] == -7).all() and (got[batch:] == -7).all()
