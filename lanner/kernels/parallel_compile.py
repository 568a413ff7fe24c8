"""Compiles Triton kernels on a pool of threads instead of one at a time as they launch.

Inside ``compile_launches(workers)``, a Triton launch does not run: the first launch of
each kernel variant (the signature, specializations and constexprs it would compile for)
hands it to Triton's asynchronous compile mode, which compiles it on the pool and then
builds its C launcher there too (Triton compiles one with the host C compiler at a
kernel's first run; an empty-cache profile run took 3.9 s on the H200, 0.4 s warm).
Leaving the block waits for them all, puts them in each kernel's in-memory cache and
loads each onto the device (its module), so that a first run, even inside a CUDA graph
capture, compiles and loads nothing. A caller runs the steps it is about to run once
inside (their outputs are garbage: nothing reads them).

Later launches of a variant already handed over return at once: the asynchronous mode
alone redoes Triton's per-launch bookkeeping at every one of the 8B startup's 9,105
launches (its pass took 6.3 s on a warm H200 start, with benchmarks/cold_start.py's
compile hooks on). On an empty Triton cache the startup's ~20 variants (llama3-8b:
benchmarks/startup_kernels.py) otherwise compile one after another; on a warm one the
pool loads them. While inside, no launch from any thread of the process runs: use it at
startup only. Without Triton's asynchronous mode (before 3.5) each variant compiles at
once, in turn. LANNER_PARALLEL_COMPILE=0 turns it off (``enabled``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import triton
from triton.runtime import driver

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


class _CompileThenBuildLauncher:
    """The executor Triton's asynchronous mode submits compiles to: each task compiles a
    kernel, then builds its launcher (into Triton's cache: the first run then only loads
    it), on the pool."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool

    def submit(self, compile_kernel: Callable[[], Any]) -> Future:
        return self.pool.submit(self._compile, compile_kernel)

    @staticmethod
    def _compile(compile_kernel: Callable[[], Any]) -> Any:
        kernel = compile_kernel()
        driver.active.launcher_cls(kernel.src, kernel.metadata)
        return kernel


def _variant_key(jit: Any, args: tuple, kwargs: dict) -> Any:
    """What tells one launch's variant from another's (the key Triton's run looks its
    compiled kernels up by, before hashing), or None where this Triton lays its caches
    out otherwise."""
    try:
        binder = jit.device_caches[driver.active.get_current_device()][4]
        _, specialization, options = binder(*args, **kwargs)
        return (id(jit), tuple(specialization), str(options))
    except Exception:  # noqa: BLE001 - another Triton version: no shortcut
        return None


@contextlib.contextmanager
def compile_launches(workers: int | None = None) -> Iterator[None]:
    """Within, every Triton launch compiles its variant on ``workers`` threads instead of
    running (see the module docstring); on exit every variant is compiled and loaded onto
    the current device."""
    jit_function = triton.runtime.JITFunction
    launch = jit_function.run
    handed_over: set[Any] = set()
    handed: list[Any] = []  # what each first launch returned: a kernel, or its future

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        key = _variant_key(self, args, kwargs)
        if key is not None and key in handed_over:
            return None
        handed_over.add(key)
        handed.append(launch(self, *args, grid=grid, warmup=True, **kwargs))
        return None

    jit_function.run = compile_only
    try:
        if AsyncCompileMode is None:
            yield
        else:
            pool = ThreadPoolExecutor(workers or default_workers(), "triton-compile")
            # Leaving waits for every compile, then for the pool.
            with pool, AsyncCompileMode(_CompileThenBuildLauncher(pool)):
                yield
    finally:
        jit_function.run = launch
    for compiled in handed:
        kernel = compiled.result() if hasattr(compiled, "result") else compiled
        if kernel is not None:
            # Loads its module onto the device (and checks its resources), as a first run
            # would: a first run inside a CUDA graph capture then has nothing to load.
            _ = kernel.run
