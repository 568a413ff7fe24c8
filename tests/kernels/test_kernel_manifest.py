"""kernels/kernel_manifest.py: a startup's kernel variants are recorded, written beside
Triton's cache under a key of everything that decides them, read back only for the same
key, and loaded by ``parallel_compile.load_variants`` into each kernel's in-memory cache
under the key a launch looks up (so the launch compiles nothing); a variant the manifest
lacks fails a ``refuse_compiles`` block (a graph capture) instead of compiling in it.

The round trip runs in two subprocesses outside TRITON_INTERPRET (real JITFunctions) with
the stand-in sm_90 driver of test_parallel_compile.py: the first records and writes, the
second, a fresh process over the same Triton cache, loads; ~8 s, two small compiles. And
every variant of the 8B shape's startup preloads as its launch compiles (~10 s, no
compile)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lanner.kernels import kernel_manifest
from lanner.kernels.kernel_manifest import Variant
from tests.kernels.test_parallel_compile import STAND_IN_DRIVER
from tests.outside_interpreter import run_outside_interpreter

IDENTITY = {"model_config": {"hidden_size": 64}, "dtype": "torch.bfloat16", "shape": [8, 2]}


def _variant(name: str = "_silu_and_mul_kernel", key: str = "k1") -> Variant:
    data = json.dumps({"name": f"lanner.kernels.activation.{name}", "key": key})
    return Variant("lanner.kernels.activation", name, data)


def test_written_manifest_reads_back_for_its_identity_only(tmp_path: Path) -> None:
    path = kernel_manifest.manifest_path(IDENTITY, tmp_path)
    assert path.parent == tmp_path and path.name.startswith(kernel_manifest.FILE_PREFIX)
    assert kernel_manifest.read(path, IDENTITY) is None  # none yet
    variants = [_variant(key="k1"), _variant(key="k2")]
    assert kernel_manifest.write(path, IDENTITY, variants)
    assert kernel_manifest.read(path, IDENTITY) == variants
    assert not list(tmp_path.glob(".manifest-*"))  # the temporary file was renamed
    # Anything that decides the variants gives another file, and this file is refused
    # under another identity (say, one copied or renamed by hand).
    other = {**IDENTITY, "dtype": "torch.float16"}
    assert kernel_manifest.manifest_path(other, tmp_path) != path
    assert kernel_manifest.read(path, other) is None


def test_key_covers_lanner_source_switches_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    before = kernel_manifest.identity_key(IDENTITY)
    monkeypatch.setattr(kernel_manifest, "source_digest", lambda: "edited")
    assert kernel_manifest.identity_key(IDENTITY) != before
    monkeypatch.undo()
    monkeypatch.setattr(kernel_manifest.triton, "__version__", "0.0-other")
    assert kernel_manifest.identity_key(IDENTITY) != before
    monkeypatch.undo()
    monkeypatch.setenv("LANNER_PDL", "0")
    assert kernel_manifest.identity_key(IDENTITY) != before
    monkeypatch.undo()
    monkeypatch.setenv("LANNER_API_KEY", "secret")  # not a kernel switch
    assert kernel_manifest.identity_key(IDENTITY) == before


def test_unreadable_or_foreign_manifests_are_ignored(tmp_path: Path) -> None:
    path = kernel_manifest.manifest_path(IDENTITY, tmp_path)
    path.write_text("{not json")
    assert kernel_manifest.read(path, IDENTITY) is None
    kernel_manifest.write(path, IDENTITY, [_variant()])
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format": kernel_manifest.MANIFEST_FORMAT + 1}))
    assert kernel_manifest.read(path, IDENTITY) is None
    path.write_text(json.dumps({**data, "variants": [{"module": "m"}]}))
    assert kernel_manifest.read(path, IDENTITY) is None


def test_unwritable_folder_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not kernel_manifest.write(blocker / "manifest.json", IDENTITY, [_variant()])


def test_variants_of_removed_kernels_do_not_resolve() -> None:
    # (One that does resolve: the round trip below, outside the interpreter.)
    assert _variant("_no_such_kernel").resolve() is None
    assert Variant("lanner.kernels.no_such_module", "k", "{}").resolve() is None
    assert Variant("lanner.kernels.activation", "f.<locals>.k", "{}").resolve() is None
    first, second = [_variant(key="a"), _variant(key="b")], [_variant(key="b"), _variant(key="a")]
    assert kernel_manifest.same_variants(first, second)
    assert not kernel_manifest.same_variants(first, first[:1])


def test_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_manifest.enabled()
    monkeypatch.setenv("LANNER_KERNEL_MANIFEST", "0")
    assert not kernel_manifest.enabled()


RECORD = (
    STAND_IN_DRIVER
    + """
import sys
from pathlib import Path

from lanner.kernels import activation, kernel_manifest, parallel_compile

path = Path(sys.argv[1])
with kernel_manifest.VariantRecorder() as recorder:
    with parallel_compile.compile_launches(2):
        activation.silu_and_mul(torch.empty(4, 64, dtype=torch.bfloat16))
        activation.silu_and_mul(torch.empty(4, 64, dtype=torch.float32))
kernel_manifest.write(path, {"test": 1}, recorder.variants)
print(json.dumps([v.qualname for v in recorder.variants]))
"""
)

LOAD = (
    STAND_IN_DRIVER
    + """
import triton
import sys
from pathlib import Path

from lanner.kernels import activation, kernel_manifest, parallel_compile

known = kernel_manifest.read(Path(sys.argv[1]), {"test": 1})
compiled = handed_to_triton
with kernel_manifest.VariantRecorder() as recorder:
    parallel_compile.load_variants([(v.resolve(), v.specialization) for v in known], 2)
loaded = list(compiled)
# Launches of the listed variants now find them in the in-memory cache (warmup: the
# stand-in driver has no launcher to run them with); an unlisted one must not compile.
launch = jit.JITFunction.run


def look_up_only(self, *args, grid, warmup, **kwargs):
    return launch(self, *args, grid=grid, warmup=True, **kwargs)


jit.JITFunction.run = look_up_only
with parallel_compile.refuse_compiles("the test"):
    activation.silu_and_mul(torch.empty(4, 64, dtype=torch.bfloat16))
    activation.silu_and_mul(torch.empty(8, 64, dtype=torch.float32))
    try:
        activation.silu_and_mul(torch.empty(4, 64, dtype=torch.float16))
        refused = None
    except parallel_compile.KernelNotCompiledAhead as err:
        refused = str(err)
print(json.dumps({
    "listed": len(known),
    "handed_to_triton": loaded,
    "compiled_after": compiled[len(loaded):],
    "loaded_onto_device": StandInUtils.loaded,
    "launchers_on_pool": sum(t.startswith("triton-compile") for _, t in StandInDriver.launchers),
    "recorded_again": len(recorder.variants),
    "refused": refused,
    "hook_restored": triton.knobs.runtime.jit_cache_hook is None,
}))
"""
)


def test_manifest_round_trip_loads_exactly_its_variants(tmp_path: Path) -> None:
    cache = tmp_path / "triton-cache"
    env = {"TRITON_CACHE_DIR": str(cache)}
    path = tmp_path / "manifest.json"
    recorded = run_outside_interpreter(RECORD, str(path), env=env)
    assert recorded == ["_silu_and_mul_kernel"] * 2
    found = run_outside_interpreter(LOAD, str(path), env=env)
    assert found["listed"] == 2
    assert found["handed_to_triton"] == ["_silu_and_mul_kernel"] * 2  # on the pool
    assert found["launchers_on_pool"] == 2
    assert found["loaded_onto_device"] == ["_silu_and_mul_kernel"] * 2
    assert found["recorded_again"] == 2
    # Both listed variants hit the in-memory cache (the float32 one at another row
    # count: rows are not specialized on); float16 was never listed and is refused.
    assert found["compiled_after"] == ["_silu_and_mul_kernel"]
    assert "_silu_and_mul_kernel" in found["refused"] and "the test" in found["refused"]
    assert found["hook_restored"]
    assert os.listdir(cache)


STARTUP = (
    STAND_IN_DRIVER
    + """
import sys

import triton.runtime.jit as jit

import lanner.model.loader as loader
import lanner.runner.model_runner as model_runner
from lanner.kernels import ops
from lanner.kernels.kernel_manifest import Variant
from tests.kernels.test_compile_for_hopper import force_programmatic_launch

meta = torch.device("meta")  # as benchmarks/startup_kernels.py builds it: no memory
loader.resolve_device = lambda device: meta
loader.dummy_init = lambda *args, **kwargs: None
loaded = loader.load_model(sys.argv[1], "bfloat16", meta, "dummy")
ops.use_triton = lambda x: True
force_programmatic_launch()


def compile_inputs(fn, key, signature, constexprs, options, attrs):
    # What Triton's compile and its on-disk cache key are made of.
    return key, fn.ASTSource(fn, signature, constexprs, attrs).hash(), options.hash()


launched = {}


def record(self, key, signature, device, constexprs, options, attrs, warmup):
    if (self, key) not in launched:
        data = jit.serialize_specialization_data(
            jit.get_full_name(self.fn), signature, constexprs, attrs, options, key
        )
        variant = Variant(self.fn.__module__, self.fn.__qualname__, data)
        launched[(self, key)] = variant, compile_inputs(
            self, key, signature, constexprs, options, attrs
        )


jit.JITFunction._do_compile = record  # nothing compiles; a launch returns at once
runner = model_runner.ModelRunner(loaded, 16, loaded.dtype)
runner.launch_startup_steps(model_runner.StartupShape(8192, 256, max_model_len=8192))
preloaded = []


def capture(self, key, signature, device, constexprs, options, attrs, warmup):
    preloaded.append(compile_inputs(self, key, signature, constexprs, options, attrs))


jit.JITFunction._do_compile = capture
mismatched, unresolved = [], []
for (function, key), (variant, original) in launched.items():
    if variant.resolve() is not function:
        unresolved.append(variant.qualname)
        continue
    function.preload(variant.specialization)
    if preloaded[-1] != original:
        mismatched.append([variant.qualname, preloaded[-1], original])
print(json.dumps({
    "kernels": sorted({variant.qualname for variant, _ in launched.values()}),
    "mismatched": mismatched,
    "unresolved": unresolved,
}))
"""
)


def test_every_startup_variant_preloads_as_its_launch_compiles(tmp_path: Path) -> None:
    """Each variant the 8B shape's startup launches (two layers; profile steps, every
    graph size, the sampler), serialized as Triton's hooks report it and preloaded from
    that, reaches Triton's compile with the same in-memory key, source hash and options
    hash as the launch did: it is the same entry of Triton's cache. Nothing compiles."""
    config = json.loads(Path("benchmarks/shapes/llama3-8b/config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    found = run_outside_interpreter(STARTUP, str(tmp_path))
    assert len(found["kernels"]) >= 8, found["kernels"]
    assert found["unresolved"] == []
    assert found["mismatched"] == []
