"""The host side of a CUDA-graph decode step: staging a batch into the pinned arrays the
graph's inputs are copied from (runs on the CPU; the replay itself needs a GPU)."""

from __future__ import annotations

import numpy as np

from lanner.runner.cuda_graphs import capture_sizes, stage_inputs


def test_stage_inputs_pads_rows_and_writes_each_table() -> None:
    host = np.full((4, 8), 99, dtype=np.int64)
    flat = np.full(40, 77, dtype=np.int32)  # stale entries from an earlier step
    width = stage_inputs(
        host, flat, 4, [11, 12, 13], [5, 0, 17], [81, 3, 95], [6, 1, 18], [[5], [0], [3, 9]]
    )
    assert width == 2
    tables = flat[: 3 * width].reshape(3, width)  # contiguous at the front: one copy
    assert host[:, :4].tolist() == [
        [11, 12, 13, 0],
        [5, 0, 17, 0],
        [81, 3, 95, -1],  # the padding row writes no K/V
        [6, 1, 18, 0],  # and attends to nothing
    ]
    assert (host[:, 4:] == 99).all()  # columns past the graph's batch are not touched
    assert tables[0, :1].tolist() == [5] and tables[2, :2].tolist() == [3, 9]
    assert tables[1, 0] == 0
    assert (flat[6:] == 77).all()


def test_capture_sizes_cover_every_batch() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and len(sizes) == 35
