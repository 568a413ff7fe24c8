"""Compiles Triton kernels on a pool of threads instead of one at a time as they launch.

Inside ``compile_launches(workers)``, a Triton launch does not run: it hands its kernel
variant (the signature, specializations and constexprs it would compile for) to Triton's
asynchronous compile mode, which compiles each distinct variant once on the pool; leaving
the block waits for them all and puts them in each kernel's in-memory cache. A caller
runs the steps it is about to run once inside (their outputs are garbage: nothing reads
them), and the real steps then compile nothing. On an empty Triton cache, startup's ~20
variants (llama3-8b: ``benchmarks/startup_kernels.py``) otherwise compile serially.

While inside, no launch from any thread of the process runs; use it at startup only.
Without Triton's asynchronous mode (before 3.5) each variant compiles at once, in turn.
LANNER_PARALLEL_COMPILE=0 turns it off (``enabled``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import triton

try:
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # older Triton: compiled one by one
    AsyncCompileMode = None


def enabled() -> bool:
    """Off with LANNER_PARALLEL_COMPILE=0 (each kernel then compiles at its first launch)."""
    return os.environ.get("LANNER_PARALLEL_COMPILE", "1") != "0"


def default_workers() -> int:
    """Compile threads: the cores this process may use, at most 32."""
    return max(1, min(32, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def compile_launches(workers: int | None = None) -> Iterator[None]:
    """Within, every Triton launch compiles its variant on ``workers`` threads instead of
    running (see the module docstring); on exit every variant is compiled."""
    jit_function = triton.runtime.JITFunction
    launch = jit_function.run

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    jit_function.run = compile_only
    try:
        if AsyncCompileMode is None:
            yield
            return
        pool = ThreadPoolExecutor(workers or default_workers(), "triton-compile")
        with pool, AsyncCompileMode(pool):  # leaving waits for every compile, then the pool
            yield
    finally:
        jit_function.run = launch
