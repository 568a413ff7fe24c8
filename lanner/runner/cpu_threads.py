"""How many threads the CPU runs the model's operations on."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a
    container's cpuset), else all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_threads() -> int:
    """OMP_NUM_THREADS when set; otherwise one per available core but one, which is left
    to the host side (scheduling, detokenizing, the server's processes), as vLLM's CPU
    backend reserves one. On a busy 2-core machine, two threads made TPOT swing from 72
    to 300 ms; one held steady (issue 22)."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, available_cores() - 1)


def default_host_threads() -> int:
    """Threads for torch's host-side operations when the model runs on a GPU:
    OMP_NUM_THREADS when set, else one. Those operations are tiny (index lists, pinned
    staging), and torch's default pool of one thread a core made the demo model's batch-1
    decode step on the H200 ~2x slower than one thread (benchmarks/spec_decode.py, W7),
    as vLLM's workers also find (they set one)."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return 1


def set_num_threads(num_threads: int | None, host_side: bool = False) -> int:
    """Run torch's CPU operations on ``num_threads`` threads (None: the default, for a
    model on the CPU or, with ``host_side``, for the host's side of a GPU's); returns the
    count. Process-wide: torch has one intra-op thread pool."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    count = num_threads or (default_host_threads() if host_side else default_num_threads())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
