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

``load_variants`` compiles or loads a list of variants (kernel_manifest.py's, from the
last start) the same way without running anything; ``refuse_compiles`` makes a launch
that would compile raise instead (a CUDA graph capture that counts on none).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import triton
from triton.runtime import cache as triton_cache
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
        with _compile_pool(workers):
            yield
    finally:
        jit_function.run = launch
    _load_onto_device(handed)


def load_variants(variants: list[tuple[Any, str]], workers: int | None = None) -> None:
    """Compile (or load from Triton's cache) each (JITFunction, serialized specialization
    data) variant on ``workers`` threads, as ``compile_launches`` would have for a launch
    of it, and load each onto the current device; nothing runs. Raises what Triton raises
    for a variant it cannot rebuild (a stale manifest: the caller compiles the old way)."""
    handed: list[Any] = []
    with _compile_pool(workers):
        for function, specialization in variants:
            handed.append(function.preload(specialization))
    _load_onto_device(handed)


@contextlib.contextmanager
def _compile_pool(workers: int | None) -> Iterator[None]:
    """Triton's asynchronous compile mode over a pool of threads (nothing without it);
    leaving waits for every compile, then for the pool."""
    if AsyncCompileMode is None:
        yield
        return
    warm_triton_key(wait=True)
    pool = ThreadPoolExecutor(workers or default_workers(), "triton-compile")
    with pool, AsyncCompileMode(_CompileThenBuildLauncher(pool)):
        yield


def _load_onto_device(handed: list[Any]) -> None:
    for compiled in handed:
        kernel = compiled.result() if hasattr(compiled, "result") else compiled
        if kernel is not None:
            # Loads its module onto the device (and checks its resources), as a first run
            # would: a first run inside a CUDA graph capture then has nothing to load.
            _ = kernel.run


class KernelNotCompiledAhead(RuntimeError):
    """A Triton kernel variant was about to compile where ``refuse_compiles`` forbids it."""


@contextlib.contextmanager
def refuse_compiles(where: str) -> Iterator[None]:
    """Within, a launch of a variant missing from its kernel's in-memory cache raises
    KernelNotCompiledAhead instead of compiling (Triton's cache hook: in-memory hits do
    not reach it): a CUDA graph capture that counted on every variant being compiled
    ahead fails loudly, and its caller captures again with warm-ups, instead of
    compiling inside the capture."""
    knobs = triton.knobs.runtime
    previous = knobs.jit_cache_hook

    def refuse(**info: Any) -> None:
        raise KernelNotCompiledAhead(
            f"Triton kernel {info['fn'].name} would compile a variant not compiled ahead "
            f"({where}): {info['repr']}"
        )

    knobs.jit_cache_hook = refuse
    try:
        yield
    finally:
        knobs.jit_cache_hook = previous


_TRITON_KEY: dict[str, threading.Thread] = {}
KEY_FILE_PREFIX = "lanner-triton-key-"


def warm_triton_key(wait: bool = False) -> None:
    """Have Triton's own cache-key part ready before the first compile or cache lookup
    needs it: a hash of Triton's sources and its 400 MB libtriton (~0.45 s on a 2-core
    Xeon, 0.3-0.6 s of the H200's warm 8B start, once a process). The value is kept in
    Triton's cache folder under a stamp of every file of the Triton package (path, size,
    modification time), so a later process reads it back; otherwise it is computed on a
    thread, overlapping the model's build. ``wait`` joins that thread."""
    thread = _TRITON_KEY.get("thread")
    if thread is None:
        compute = getattr(triton_cache, "triton_key", None)
        if compute is None:  # another Triton: its first compile computes what it needs
            return
        thread = threading.Thread(
            target=_install_triton_key, args=(compute,), name="triton-key", daemon=True
        )
        _TRITON_KEY["thread"] = thread
        known = _read_triton_key()
        if known is not None:
            triton_cache.triton_key = functools.cache(lambda: known)
            return
        thread.start()
    if wait and thread.is_alive():
        thread.join()


def _triton_stamp() -> str:
    """sha256 of every file of the Triton package: relative path, size, mtime."""
    root = os.path.dirname(triton.__file__)
    digest = hashlib.sha256(triton.__version__.encode())
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(".pyc"):
                continue
            path = os.path.join(folder, name)
            info = os.stat(path)
            entry = f"{os.path.relpath(path, root)}\0{info.st_size}\0{info.st_mtime_ns}\0"
            digest.update(entry.encode())
    return digest.hexdigest()


def _key_path() -> str:
    return os.path.join(triton.knobs.cache.dir, f"{KEY_FILE_PREFIX}{_triton_stamp()[:40]}")


def _read_triton_key() -> str | None:
    try:
        with open(_key_path()) as stored:
            return stored.read() or None
    except OSError:
        return None


def _install_triton_key(compute: Callable[[], str]) -> None:
    value = compute()
    path = _key_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(value)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache folder: computed again by the next process
