"""Programmatic dependent launch (Hopper and later): a kernel may be launched while the
one before it in the stream is still running, and waits on the device, not the host,
before touching memory. In a decode step's CUDA graph of ~300 small kernels this hides
each launch behind the kernel before it.

Every kernel launched with ``launch_options`` calls ``pdl_start(PDL)`` first: it waits
until the previous kernel has finished and its writes are visible (before any load or
store, so no read-after-write or write-after-read can race), then lets the next kernel
launch. Off on the CPU interpreter, before sm_90, and with LANNER_PDL=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as triton_cuda


@triton.jit
def pdl_start(PDL: tl.constexpr):
    if PDL:
        triton_cuda.gdc_wait()
        triton_cuda.gdc_launch_dependents()


# Decided at import, as the interpreter is: launch_options runs at every launch.
_OFF = os.environ.get("LANNER_PDL", "1") == "0" or bool(triton.knobs.runtime.interpret)


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(tensor: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments for a launch on ``tensor``'s device: the kernel's PDL constexpr,
    and Triton's launch_pdl option where the device supports it."""
    if _OFF or not tensor.is_cuda:
        return {"PDL": False}
    index = tensor.device.index
    if _supported(torch.cuda.current_device() if index is None else index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
