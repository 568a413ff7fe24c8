"""The host side of a CUDA-graph decode step: staging a batch into the pinned block the
graph's inputs are copied from in one copy (runs on the CPU; the replay itself needs a
GPU)."""

from __future__ import annotations

import numpy as np
import torch

from lanner.kernels.graph_inputs import GraphInputLayout
from lanner.runner.cuda_graphs import DecodeGraphs, DeviceTokenIndex, capture_sizes, stage_inputs


def test_stage_inputs_pads_rows_and_writes_each_table() -> None:
    layout = GraphInputLayout(max_batch=8, max_blocks=5)
    packed = np.full(layout.size, 99, dtype=np.int64)  # stale entries from an earlier step
    used = stage_inputs(
        packed,
        layout,
        4,
        [11, 12, 13],
        [5, 0, 17],
        [81, 3, 95],
        [6, 1, 18],
        [[5], [0], [3, 9]],
        32,
    )
    width = 2
    assert used == layout.tables + 3 * width  # the leading entries: one copy moves them
    fields = [layout.ids, layout.positions, layout.slots, layout.seq_lens]
    assert [packed[start : start + 4].tolist() for start in fields] == [
        [11, 12, 13, 0],
        [5, 0, 17, 0],
        [81, 3, 95, -1],  # the padding row writes no K/V
        [6, 1, 18, 0],  # and attends to nothing
    ]
    # Rows past the graph's batch are not touched.
    assert all((packed[start + 4 : start + 8] == 99).all() for start in fields)
    assert packed[layout.prefix] == 32 and packed[layout.width] == width
    tables = packed[layout.tables : used].reshape(3, width)  # row after row at the width
    assert tables[0, :1].tolist() == [5] and tables[2, :2].tolist() == [3, 9]
    assert tables[1, 0] == 0
    assert (packed[used:] == 99).all()


def test_capture_sizes_cover_every_batch() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and len(sizes) == 35


def test_device_tokens_are_gathered_from_the_block_alone() -> None:
    """Rows fed by the step before's samples and by drafts: ``stage`` writes where they
    are into the block, and the replay's gathers read nothing else (here on the CPU:
    the block copied as the replay copies it, then the gathers)."""
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # the staging half only: no model, no graphs
    graphs.layout = GraphInputLayout(max_batch=8, max_blocks=4)
    graphs.packed = torch.zeros(graphs.layout.size, dtype=torch.long)
    graphs.input_ids = graphs.packed[: graphs.layout.max_batch]
    graphs.host_sets = [torch.zeros(graphs.layout.size, dtype=torch.long) for _ in range(2)]
    graphs.sizes, graphs.turn, graphs.block_size = [1, 2, 4, 8], 0, 16
    # Three requests: a plain decode fed by sample 1 of the step before, one verifying
    # two drafts (draft row 0) after its own sample 0, one verifying a draft (row 1).
    index = DeviceTokenIndex(
        previous_rows=[0, 1],
        previous_sources=[1, 0],
        draft_rows=[2, 3, 5],
        draft_sources=[0, 0, 1],
        draft_columns=[0, 1, 0],
    )
    staged = graphs.stage(
        [-1, -1, -1, -1, 40, -1],
        [7, 3, 4, 5, 9, 10],
        [7, 3, 4, 5, 9, 10],
        [8, 4, 5, 6, 10, 11],
        [[0], [1], [1], [1], [2], [2]],
        index,
    )
    assert (staged.num_previous, staged.num_drafted) == (2, 3)
    graphs.packed[: staged.used] = graphs.host_sets[staged.turn][: staged.used]
    previous = torch.tensor([100, 101])
    drafts = torch.tensor([[200, 201], [210, -1]])
    graphs._gather_tokens(staged, previous, drafts)
    assert graphs.input_ids[:6].tolist() == [101, 100, 200, 201, 40, 210]
