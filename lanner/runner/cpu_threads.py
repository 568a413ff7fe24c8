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


def set_num_threads(num_threads: int | None) -> int:
    """Run torch's CPU operations on ``num_threads`` threads (None: the default); returns
    the count. Process-wide: torch has one intra-op thread pool."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    count = num_threads or default_num_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
