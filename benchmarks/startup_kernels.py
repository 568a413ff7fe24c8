"""Which Triton kernel variants an engine's startup compiles, counted on the CPU: the
profile run's steps, one warm-up forward per CUDA graph batch size, and the sampler, for a
model shape (default llama3-8b, bf16), without a GPU.

The model is built on the meta device (no memory, no arithmetic) and the Triton wrappers
are forced on; ``JITFunction.run`` is replaced by tests/kernels/test_compile_for_hopper.py's
recorder, which computes what each launch would compile for the H100/H200 (signature,
16-byte alignment, ints equal to 1 or divisible by 16, constexprs, num_warps/num_stages)
and launches nothing. Each distinct variant is one compile on an empty Triton cache. With
--compile-to (ttir, llir, ptx, cubin) the variants are also compiled for sm_90 here, one
process a core, to time them.

    PYTHONPATH=. .venv/bin/python benchmarks/startup_kernels.py [--compile-to cubin]

Prints the variants per kernel and the step that first launched each; with --out writes
the JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE_8B = REPO / "benchmarks" / "shapes" / "llama3-8b"


def record_startup_variants(
    model: str,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    max_model_len: int = 8192,
    block_size: int = 16,
) -> Any:
    """The recorder after an engine startup's launches (``recorder.variants``: each
    distinct variant with the steps that launched it, in launch order)."""
    import torch
    import triton

    import lanner.model.loader as loader
    import lanner.runner.model_runner as model_runner
    from lanner.kernels import ops
    from lanner.runner.cuda_graphs import DecodeGraphs

    try:
        import pytest  # noqa: F401 - the recorder's module imports it
    except ImportError:  # a GPU machine without the test extras: the recorder needs none
        sys.modules["pytest"] = types.ModuleType("pytest")
    from tests.kernels.test_compile_for_hopper import CompileRecorder, force_programmatic_launch

    meta = torch.device("meta")
    build_device, dummy_init = loader.resolve_device, loader.dummy_init
    loader.resolve_device = lambda device: meta
    loader.dummy_init = lambda *args, **kwargs: None  # meta tensors hold no values
    try:
        loaded = loader.load_model(model, "bfloat16", meta, "dummy")
    finally:
        loader.resolve_device, loader.dummy_init = build_device, dummy_init
    use_triton = ops.use_triton
    ops.use_triton = lambda x: True
    force_programmatic_launch()
    recorder = CompileRecorder()
    launch = triton.runtime.JITFunction.run
    triton.runtime.JITFunction.run = lambda kernel, *a, **kw: recorder.run(kernel, *a, **kw)
    runner = model_runner.ModelRunner(loaded, block_size, loaded.dtype)
    # Each launch is named by the startup step it belongs to.
    originals = (runner.launch, DecodeGraphs._forward, model_runner.precompile_sampling)
    steps = iter(range(1 << 30))

    def profile_step(*args: Any, **kwargs: Any) -> Any:
        recorder.scenario = f"profile step {next(steps)}"
        return originals[0](*args, **kwargs)

    def graph_forward(graphs: DecodeGraphs, batch: int) -> Any:
        recorder.scenario = f"graph batch {batch}"
        return originals[1](graphs, batch)

    def sampling(*args: Any) -> None:
        recorder.scenario = "sampling"
        originals[2](*args)

    runner.launch = profile_step
    DecodeGraphs._forward = graph_forward
    model_runner.precompile_sampling = sampling
    try:
        shape = model_runner.StartupShape(
            max_num_batched_tokens, max_num_seqs, max_model_len=max_model_len
        )
        runner.launch_startup_steps(shape)
    finally:
        triton.runtime.JITFunction.run = launch
        ops.use_triton = use_triton
        DecodeGraphs._forward = originals[1]
        model_runner.precompile_sampling = originals[2]
    return recorder


def compile_in_threads(recorder: Any, stop_after: str, jobs: int) -> list[dict]:
    """Compile every recorded variant for sm_90 in ``jobs`` threads of this process."""
    from concurrent.futures import ThreadPoolExecutor

    import triton

    def compile_one(index: int) -> dict:
        source, options = recorder.sources[index]
        began = time.perf_counter()
        error = None
        try:
            triton.compile(source, target=recorder.target, options=options)
        except Exception as caught:  # noqa: BLE001 - reported with the variant
            error = repr(caught)[:500]
        return {"error": error, "seconds": round(time.perf_counter() - began, 3)}

    if stop_after != "cubin":
        raise SystemExit("--pool thread compiles through cubin only")
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(compile_one, range(len(recorder.sources))))
    variants = list(recorder.variants.values())
    for variant, result in zip(variants, results, strict=True):
        variant.update(result)
    return variants


def summarize(variants: list[dict]) -> dict[str, Any]:
    per_kernel = collections.Counter(v["kernel"] for v in variants)
    first_step = collections.Counter(v["scenarios"][0] for v in variants)
    return {
        "num_variants": len(variants),
        "per_kernel": dict(per_kernel.most_common()),
        "new_variants_per_step": dict(first_step),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHAPE_8B))
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--compile-to", default=None, help="ttir, llir, ptx or cubin")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--pool",
        default="process",
        choices=("process", "thread"),
        help="compile in forked processes or in threads of this one (does Triton's compile "
        "release the GIL: threads' wall time against processes')",
    )
    parser.add_argument("--out", default=None, help="JSON summary path")
    args = parser.parse_args(argv)
    import triton

    if triton.knobs.runtime.interpret:
        sys.exit("unset TRITON_INTERPRET: under it @triton.jit gives interpreter functions")
    started = time.perf_counter()
    recorder = record_startup_variants(args.model, args.max_num_seqs)
    compiling = time.perf_counter()
    if args.compile_to and args.pool == "thread":
        variants = compile_in_threads(recorder, args.compile_to, args.jobs)
    elif args.compile_to:
        variants = recorder.compile_all(args.compile_to, args.jobs)
    else:
        variants = list(recorder.variants.values())
    summary = summarize(variants)
    summary["seconds"] = time.perf_counter() - started
    if args.compile_to:
        summary.update(
            pool=args.pool, jobs=args.jobs, compile_wall_s=time.perf_counter() - compiling
        )
        summary["compile_seconds"] = sum(v["seconds"] for v in variants)
        summary["failures"] = [v for v in variants if v["error"]]
    for variant in variants:
        shown = {k: v for k, v in variant["constexprs"].items() if k != "PDL"}
        took = f" {variant['seconds']:.2f} s" if "seconds" in variant else ""
        print(f"{variant['kernel']}{took} [{variant['scenarios'][0]}] {shown}")
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
    if args.out:
        summary["variants"] = variants
        Path(args.out).write_text(json.dumps(summary, indent=1, default=repr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
