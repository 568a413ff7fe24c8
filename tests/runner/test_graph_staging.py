"""The host side of a CUDA-graph decode step: staging a batch into the pinned block the
graph's inputs are copied from in one copy (runs on the CPU; the replay itself needs a
GPU)."""

from __future__ import annotations

import numpy as np

from lanner.kernels.graph_inputs import GraphInputLayout
from lanner.runner.cuda_graphs import capture_sizes, stage_inputs


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
