"""kernels/parallel_compile.py, off the GPU: inside ``compile_launches`` a launch compiles
its variant once on the pool (a repeated launch of the same variant is not handed to
Triton again), builds its launcher there, and after the block each variant sits compiled
in the kernel's in-memory cache and loaded onto the device, so the real launches (and a
CUDA graph capture's) compile and load nothing.

Triton has no driver on the CPU, so a stand-in reports an sm_90 device (the compiles are
real, for sm_90 through cubin) and records the launchers it is asked to build. Runs in a
subprocess outside TRITON_INTERPRET (real JITFunctions); ~5 s, two small compiles."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.outside_interpreter import run_outside_interpreter

STAND_IN_DRIVER = """
import json
import threading

import torch
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class StandInUtils:
    loaded = []

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448}

    def load_binary(self, name, kernel, shared, device):
        StandInUtils.loaded.append(name)
        return None, None, 32, 0, 1024


class StandInDriver:
    launchers = []
    utils = StandInUtils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def launcher_cls(self, src, metadata):
        StandInDriver.launchers.append((src.fn.__name__, threading.current_thread().name))

    def is_active(self):
        return True


driver.set_active(StandInDriver())
# Every variant handed to Triton's compile (or its cache), by kernel name.
handed_to_triton = []
do_compile = jit.JITFunction._do_compile


def counting(self, *args, **kwargs):
    handed_to_triton.append(self.fn.__name__)
    return do_compile(self, *args, **kwargs)


jit.JITFunction._do_compile = counting
"""

SCRIPT = (
    STAND_IN_DRIVER
    + """from lanner.kernels import activation, parallel_compile

with parallel_compile.compile_launches(2):
    for _ in range(3):  # one variant, launched three times
        activation.silu_and_mul(torch.empty(4, 64, dtype=torch.bfloat16))
    activation.silu_and_mul(torch.empty(4, 64, dtype=torch.float32))  # a second variant
restored = jit.JITFunction.run is not None and "compile_only" not in jit.JITFunction.run.__name__
cached = activation._silu_and_mul_kernel.device_caches[0][0].values()
print(json.dumps({
    "handed_to_triton": handed_to_triton,
    "launchers": StandInDriver.launchers,
    "loaded": StandInUtils.loaded,
    "cached": [type(kernel).__name__ for kernel in cached],
    "run_restored": restored,
}))
"""
)


def test_each_variant_compiles_once_with_its_launcher_and_is_cached() -> None:
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    found = run_outside_interpreter(SCRIPT, env={"TRITON_CACHE_DIR": cache})
    assert found["handed_to_triton"] == ["_silu_and_mul_kernel"] * 2
    # Built on the pool, once a variant; loading asks again (then a hit in Triton's cache).
    on_pool = [name for name, thread in found["launchers"] if thread.startswith("triton-compile")]
    assert on_pool == ["_silu_and_mul_kernel"] * 2
    assert found["cached"] == ["CompiledKernel"] * 2
    assert found["loaded"] == ["_silu_and_mul_kernel"] * 2  # onto the device, before capture
    assert found["run_restored"]


def test_triton_key_is_kept_in_the_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton's self-hash is computed once (on a thread) and kept beside its cache; a later
    process reads it back instead of hashing Triton again, unless Triton's files changed."""
    from triton.runtime import cache as triton_cache

    from lanner.kernels import parallel_compile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compute = triton_cache.triton_key
    monkeypatch.setattr(triton_cache, "triton_key", compute)  # restored after the test
    monkeypatch.setattr(parallel_compile, "_TRITON_KEY", {})
    parallel_compile.warm_triton_key(wait=True)
    (kept,) = tmp_path.glob(f"{parallel_compile.KEY_FILE_PREFIX}*")
    assert kept.read_text() == compute()

    def must_not_run() -> str:
        raise AssertionError("Triton's key was computed again")

    monkeypatch.setattr(triton_cache, "triton_key", must_not_run)
    monkeypatch.setattr(parallel_compile, "_TRITON_KEY", {})  # a new process
    parallel_compile.warm_triton_key(wait=True)
    assert triton_cache.triton_key() == compute()
    monkeypatch.setattr(parallel_compile, "_triton_stamp", lambda: "f" * 64)  # files changed
    assert parallel_compile._read_triton_key() is None
