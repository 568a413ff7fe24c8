"""Every kernel variant the engine launches, compiled for the H100 (sm_90) on the CPU.

CI runs the kernels in Triton's CPU interpreter, which executes a kernel's body as
Python: a branch that is not taken is never type-checked, and a plain (non-constexpr)
module global reads fine. The real compiler type-checks every branch and rejects such
globals, so these bugs first showed on the GPU, each costing a GPU session (a bf16 dummy
seed pointer in the all-greedy sampling kernel; a kernel reading a plain global).

Triton compiles for a GPU it does not have, so this test does. A subprocess without
TRITON_INTERPRET (where ``@triton.jit`` gives real JITFunctions) replaces
``JITFunction.run``: a launch, instead of running, records the signature, the
specializations (dtypes, 16-byte alignment, ints equal to 1 or divisible by 16),
constexprs and options (num_warps, num_stages) that the launch would have compiled. The
engine's wrappers are driven with CPU tensors standing in for device tensors; nothing
executes, so their outputs are garbage. Each distinct variant is then compiled for
``GPUTarget("cuda", 90, 32)`` through the ``STOP_AFTER`` stage (LLVM IR: front end and
lowering, no PTX or cubin, see there why), with an empty cache, in one process a core.
The test fails on a compile error, on shared memory beyond the H100's, on a wrapper
that raises, and on a ``*_kernel`` of ``lanner.kernels`` that no scenario launched: a
new kernel needs a scenario in ``engine_scenarios``.

By hand, from the repository root with TRITON_INTERPRET unset:
``python -m tests.kernels.test_compile_for_hopper --out summary.json [--stop-after cubin]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: the H100
# Last compile stage run. "llir" has run the front end (ttir: typing, where both bugs
# above fail), the lowering to the GPU dialect (ttgir) and to LLVM IR. The ~130 variants
# took, on 2 cores: 4 s through ttir, 21 s through llir, 25 s through ptx (LLVM's NVPTX
# backend), 37 s through cubin (ptxas). The last two rarely reject what lowered, so CI
# stops at llir; ``--stop-after cubin`` runs everything.
STOP_AFTER = "llir"
# Dynamic shared memory one block may opt into on the H100; launch checks it.
H100_MAX_SHARED_BYTES = 232448
BLOCK_SIZE = 16  # the engine's default KV cache block size
# Kernels every run must compile, whatever else lanner.kernels defines.
REQUIRED_KERNELS = {
    "_decode_partial_kernel",
    "_cascade_prefix_kernel",
    "_decode_reduce_kernel",
    "_prefill_kernel",
    "_qkv_prepare_kernel",
    "_rms_norm_kernel",
    "_silu_and_mul_kernel",
    "_race_chunk_kernel",
    "_race_row_kernel",
    "_exponential_noise_kernel",
    "_skinny_matmul_kernel",
    "_int4_gemv_kernel",
    "_w4a16_tiled_kernel",
    "_dequantize_int4_kernel",
    "_w8a8_matmul_kernel",
    "_quantize_rows_kernel",
    "_unpack_graph_inputs_kernel",
}


# -- known-bad kernels: the interpreter runs them, the compiler must reject them ----------

_PLAIN_GLOBAL = 2.0  # not a tl.constexpr: the compiler refuses to read it


@triton.jit
def _bad_dead_branch_kernel(
    out_ptr, temperatures_ptr, seeds_ptr, BLOCK: tl.constexpr, ALL_GREEDY: tl.constexpr
):
    # The pattern of the sampling bug: with ALL_GREEDY the interpreter never enters the
    # branch, but the compiler type-checks it, and tl.rand takes no bf16 seed.
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    scores = tl.load(out_ptr + row * BLOCK + columns)
    temperature = 0.0 if ALL_GREEDY else tl.load(temperatures_ptr + row)
    if temperature > 0:
        scores = scores / temperature - tl.log(tl.rand(tl.load(seeds_ptr + row), columns))
    tl.store(out_ptr + row * BLOCK + columns, scores)


@triton.jit
def _bad_plain_global_kernel(out_ptr, BLOCK: tl.constexpr):
    columns = tl.arange(0, BLOCK)
    tl.store(out_ptr + columns, tl.load(out_ptr + columns) * _PLAIN_GLOBAL)


def launch_known_bad_kernels() -> None:
    """Launch both bad kernels as the sampling wrapper did: bf16 logits as dummy pointers."""
    import torch

    scores = torch.zeros(4, 16, dtype=torch.float32)
    dummy = torch.zeros(4, 16, dtype=torch.bfloat16)
    _bad_dead_branch_kernel[(4,)](scores, dummy, dummy, BLOCK=16, ALL_GREEDY=True)
    _bad_plain_global_kernel[(1,)](scores, BLOCK=16)


# -- harness (runs in the subprocess) ------------------------------------------------------


class StopCompile(Exception):
    """Raised by the stage appended after the last one wanted: compiling got that far."""


class CompileRecorder:
    """Stands in for JITFunction.run: records each distinct launched variant, to be
    compiled for TARGET by ``compile_all``."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget(*TARGET)
        self.backend = make_backend(self.target)
        self.scenario = ""
        self.variants: dict[str, dict] = {}  # description (JSON) -> variant
        self.sources: list[tuple] = []  # (ASTSource, options) of each variant, in order
        self.scenario_errors: list[dict] = []

    def run(self, kernel, *args, grid, warmup, **kwargs):
        from triton import knobs
        from triton.runtime import jit

        # What JITFunction.run does up to the compile, with the CUDA backend in place of
        # the (absent) active driver's.
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = jit.create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            self.backend, kwargs, bound_args, specialization, options
        )
        names = list(bound_args)
        variant = {
            "kernel": kernel.fn.__name__,
            "module": kernel.module,
            "signature": signature,
            "constexprs": {names[path[0]]: repr(value) for path, value in constexprs.items()},
            "attrs": {names[path[0]]: value for path, value in attrs.items() if value},
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }
        key = json.dumps(variant, sort_keys=True, default=repr)
        if key not in self.variants:
            variant["scenarios"] = []
            self.variants[key] = variant
            source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
            self.sources.append((source, options.__dict__))
        self.variants[key]["scenarios"].append(self.scenario)
        return None

    @contextlib.contextmanager
    def scenario_named(self, name: str) -> Iterator[None]:
        self.scenario = name
        try:
            yield
        except Exception:  # a wrapper that fails on CPU tensors: report it, go on
            self.scenario_errors.append({"scenario": name, "error": traceback.format_exc()})

    def compile_all(self, stop_after: str, jobs: int) -> list[dict]:
        """Compile every recorded variant, in ``jobs`` forked processes; returns the
        variants with their results."""
        # Forked workers inherit this: the sources hold JITFunctions, which don't pickle.
        _WORK.update(sources=self.sources, target=self.target, stop_after=stop_after)
        indices = range(len(self.sources))
        if jobs > 1 and len(self.sources) > 1:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(self.sources))) as pool:
                results = pool.map(_compile_one, indices, chunksize=1)
        else:
            results = [_compile_one(index) for index in indices]
        variants = list(self.variants.values())
        for variant, result in zip(variants, results, strict=True):
            variant.update(result)
        return variants


_WORK: dict = {}  # what compile_all hands its workers


def _compile_one(index: int) -> dict:
    """Compile one recorded variant; its error text, seconds and shared memory."""
    from triton.backends.nvidia.compiler import CUDABackend

    source, options = _WORK["sources"][index]
    stop = _WORK["stop_after"]
    add_stages = CUDABackend.add_stages
    reached: dict = {}

    def stop_early(module, metadata):
        reached.update(metadata)
        raise StopCompile

    def truncated(self, stages, options, language):
        add_stages(self, stages, options, language)
        names = list(stages)
        for name in names[names.index(stop) + 1 :]:
            del stages[name]
        stages["stop"] = stop_early

    CUDABackend.add_stages = truncated
    start = time.perf_counter()
    error = None
    try:
        triton.compile(source, target=_WORK["target"], options=options)
    except StopCompile:
        pass
    except Exception as caught:  # a compile error is the finding, whatever its type
        error = error_text(caught)
    finally:
        CUDABackend.add_stages = add_stages
    shared = reached.get("shared")
    # Launch would fail: Triton checks the block's shared memory against the device's.
    if error is None and shared is not None and shared > H100_MAX_SHARED_BYTES:
        error = f"OutOfResources: shared memory {shared} > {H100_MAX_SHARED_BYTES} bytes"
    return {
        "error": error,
        "seconds": round(time.perf_counter() - start, 3),
        "shared": shared,
        "reached": None if error else stop,
    }


def error_text(error: BaseException) -> str:
    """The error and its causes: the outermost CompilationError shows the kernel's line,
    the innermost exception why (those between are Triton's own library code)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < 50:
        chain.append(current)
        current = current.__cause__ or current.__context__
    shown = chain if len(chain) <= 3 else [*chain[:2], chain[-1]]
    parts = [f"{type(e).__name__}: {e}"[-2000:] for e in shown]
    return "\n-- caused by --\n".join(parts)


def engine_scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    """(name, call) for each wrapper call: the variants the engine's steps launch."""
    import torch

    from lanner.kernels import activation, qkv_prepare, rms_norm, sampling
    from lanner.kernels.attention_metadata import CASCADE_MIN_SEQS, AttentionMetadata
    from lanner.kernels.paged_attention import paged_attention

    bf16, fp16, fp32, fp8 = torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn

    def tables_for(seq_lens: list[int], first: int = 0) -> list[list[int]]:
        tables = []
        for length in seq_lens:
            count = -(-length // BLOCK_SIZE)
            tables.append(list(range(first, first + count)))
            first += count
        return tables

    # (query dtype, cache dtype, head_dim, heads, KV heads): the engine's dtypes and
    # head dims, GQA groups 1 to 8, fp8 caches under both half-precision query dtypes.
    layouts = [
        (bf16, bf16, 128, 32, 8),
        (bf16, fp8, 128, 64, 8),
        (fp16, fp16, 64, 16, 16),
        (fp16, fp8, 64, 16, 8),
        (bf16, bf16, 64, 8, 2),
        (fp32, fp32, 64, 8, 2),  # dtype="float32" on CUDA: the IEEE tl.dot path
    ]
    # Decodes (long enough for several KV splits), a prefill and an extend.
    mixed = ([1, 37, 1, 5, 1], [700, 37, 90, 300, 1])
    # Cascade: CASCADE_MIN_SEQS decodes sharing 20 blocks, and a prefill chunk.
    prefix = list(range(20))
    own = tables_for([BLOCK_SIZE] * CASCADE_MIN_SEQS, first=len(prefix))
    cascade_tables = [prefix + blocks for blocks in own] + tables_for([40], first=own[-1][-1] + 1)
    cascade = (
        [1] * CASCADE_MIN_SEQS + [40],
        [len(prefix) * BLOCK_SIZE + 1 + i % BLOCK_SIZE for i in range(CASCADE_MIN_SEQS)] + [40],
    )
    for q_dtype, cache_dtype, head_dim, heads, kv_heads in layouts:
        layout = f"{q_dtype} q, {cache_dtype} cache, head_dim {head_dim}, {heads}/{kv_heads} heads"
        batches = [("mixed", *mixed, tables_for(mixed[1]), window) for window in (None, 4096)]
        batches.append(("cascade", *cascade, cascade_tables, None))
        for kind, query_lens, seq_lens, tables, window in batches:
            for splits in (None, 1):  # chosen per step, or fixed (CUDA graphs) at one
                metadata = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE, "cpu")
                assert kind != "cascade" or metadata.shared_prefix_len_cpu, "no shared prefix"
                metadata.num_kv_splits = splits
                num_blocks = max(max(t) for t in tables) + 1
                kv_cache = torch.empty(
                    2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype
                )
                query = torch.empty(sum(query_lens), heads, head_dim, dtype=q_dtype)
                yield (
                    f"paged_attention {layout}: {kind}, splits {splits}, window {window}",
                    partial(paged_attention, query, kv_cache, metadata, 0.1, window),
                )

    # q/k/v are views of the qkv projection's output, as llama.py passes them.
    for dtype, cache_dtype, head_dim, heads, kv_heads, norm in [
        (bf16, bf16, 128, 32, 8, False),
        (bf16, bf16, 128, 16, 8, True),  # Qwen3's q/k norm
        (bf16, fp8, 128, 32, 8, True),
        (fp16, fp16, 64, 16, 4, False),
        (fp16, fp8, 64, 16, 4, True),
        (fp32, fp32, 64, 8, 2, True),
    ]:
        tokens = 5
        qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        norm_weight = torch.empty(head_dim, dtype=dtype) if norm else None
        yield (
            f"qkv_prepare {dtype}, {cache_dtype} cache, head_dim {head_dim}, norm {norm}",
            partial(
                qkv_prepare.qkv_prepare,
                q.reshape(tokens, heads, head_dim),
                k.reshape(tokens, kv_heads, head_dim),
                v.reshape(tokens, kv_heads, head_dim),
                torch.zeros(tokens, dtype=torch.long),  # positions
                torch.empty(4096, head_dim, dtype=fp32),  # cos|sin table
                torch.empty(2, 8, BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype),
                torch.zeros(tokens, dtype=torch.long),  # slot mapping
                norm_weight,
                norm_weight,
                1e-6,
            ),
        )

    # RMSNorm of hidden states (with and without the residual add), and per head of a
    # view of the qkv output.
    for dtype in (bf16, fp16, fp32):
        for hidden in (896, 4096):
            x, residual = torch.empty(7, hidden, dtype=dtype), torch.empty(7, hidden, dtype=dtype)
            weight = torch.empty(hidden, dtype=dtype)
            yield f"rms_norm {dtype} {hidden}", partial(rms_norm.rms_norm, x, weight, 1e-6)
            yield (
                f"fused_add_rms_norm {dtype} {hidden}",
                partial(rms_norm.fused_add_rms_norm, x, residual, weight, 1e-6),
            )
        heads = torch.empty(7, 48 * 128, dtype=dtype)[:, : 32 * 128].view(7, 32, 128)
        weight = torch.empty(128, dtype=dtype)
        yield f"rms_norm {dtype} per head", partial(rms_norm.rms_norm, heads, weight, 1e-6)

    for dtype in (bf16, fp16, fp32):
        for width in (4864, 11008, 320):
            x = torch.empty(7, 2 * width, dtype=dtype)
            yield f"silu_and_mul {dtype} {width}", partial(activation.silu_and_mul, x)

    # Sampling: all greedy (no temperature or seed tensors) and sampled, over the logits'
    # dtypes (the model's, or float32 after a logits processor).
    for dtype in (bf16, fp16, fp32):
        for vocab in (151936, 32000):
            logits = torch.empty(6, vocab, dtype=dtype)
            temperatures = torch.ones(6, dtype=fp32)
            seeds = torch.zeros(6, dtype=torch.int64)
            race = sampling.exponential_race
            yield f"exponential_race {dtype} {vocab} greedy", partial(race, logits, None, None)
            yield (
                f"exponential_race {dtype} {vocab} sampled",
                partial(race, logits, temperatures, seeds),
            )
            # A grammar's bitmask read by the race (the sampling graphs' variant).
            bitmask = torch.empty(6, -(-vocab // 32), dtype=torch.int32)
            bitmask_rows = torch.zeros(6, dtype=torch.int64)
            yield (
                f"exponential_race {dtype} {vocab} sampled masked",
                partial(race, logits, temperatures, seeds, bitmask, bitmask_rows),
            )
    yield (
        "exponential_noise",
        partial(sampling.exponential_noise, [1, 2, 3], 151936, torch.device("cpu")),
    )
    # Speculative decoding's acceptance draws: one Exp(1) value a row (a width of 1 is a
    # specialization of its own).
    yield (
        "exponential_noise width 1",
        partial(sampling.exponential_noise, [1, 2, 3], 1, torch.device("cpu")),
    )
    # Speculative verification's acceptance: point-mass drafts, and decided (sampled)
    # drafts with residual draws, at draft lengths of each lane width.
    from lanner.kernels.accept_drafts import accept_drafts_kernel

    # Batch sizes and draft lengths change step by step; up to k = 7 they must share one
    # variant (with decisions or without), or a run would compile mid-way (see
    # test_every_launched_kernel_variant_compiles_for_sm90).
    for max_k, requests in ((1, 1), (3, 5), (6, 16), (7, 13), (10, 5)):
        targets = torch.zeros(requests * (max_k + 1), dtype=torch.int64)
        meta = torch.zeros(3 * requests, dtype=torch.int64)
        drafts = torch.zeros(requests, max_k, dtype=torch.int64)
        decisions = torch.zeros(requests, max_k, dtype=torch.int8)
        residual = torch.zeros(requests, max_k, dtype=torch.int64)
        accept = partial(accept_drafts_kernel, targets, meta, drafts, max_k)
        yield f"accept_drafts k={max_k}", accept
        yield f"accept_drafts k={max_k} decided", partial(accept, decisions, residual)
    # A decode graph's first kernel: its packed inputs unpacked, the batch sizes and table
    # widths of a run in one variant (the graphs capture it at every size).
    from lanner.kernels.graph_inputs import (
        GraphInputLayout,
        unpack_graph_inputs,
        widen_block_tables,
    )

    for max_batch, max_blocks, batch in ((256, 512, 1), (256, 512, 96), (7, 3, 5)):
        layout = GraphInputLayout(max_batch, max_blocks)
        yield (
            f"unpack_graph_inputs {max_batch}x{max_blocks}, batch {batch}",
            partial(
                unpack_graph_inputs,
                torch.empty(layout.size, dtype=torch.int64),
                layout,
                batch,
                torch.empty(max_batch, dtype=torch.int32),
                torch.empty(1, dtype=torch.int32),
                torch.empty(max_batch, max_blocks, dtype=torch.int32),
            ),
        )
    # The EAGLE head's draft chain spreads only its tables.
    tables = torch.empty(256, 512, dtype=torch.int32)
    packed = torch.empty(3 * 256 + 2 + 256 * 512, dtype=torch.int64)
    for batch in (1, 96):
        yield (
            f"widen_block_tables batch {batch}",
            partial(widen_block_tables, packed, 3 * 256, 3 * 256 + 2, batch, tables),
        )


def skinny_scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    """skinny_matmul's variants."""
    import torch

    from lanner.kernels.skinny_matmul import skinny_matmul

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, k in [(1, 4096, 4096), (8, 4096, 4096), (16, 151936, 896), (3, 896, 4864)]:
            x, weight = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
            bias = torch.empty(n, dtype=dtype)
            name = f"skinny_matmul {dtype} {m}x{n}x{k}"
            yield name, partial(skinny_matmul, x, weight)
            yield f"{name} bias", partial(skinny_matmul, x, weight, bias)
        # Configs that benchmarks sweep: elementwise products; split-K reduced by the
        # separate kernel or fused.
        x, weight = torch.empty(2, 4096, dtype=dtype), torch.empty(4096, 4096, dtype=dtype)
        for options in [
            {"use_dot": False, "block_n": 16, "block_k": 128},
            {"split_k": 4, "fused_reduce": False},
            {"split_k": 4, "fused_reduce": True},
            {"use_dot": False, "split_k": 2, "fused_reduce": False},
        ]:
            yield (
                f"skinny_matmul {dtype} 2x4096x4096 {options}",
                partial(skinny_matmul, x, weight, **options),
            )


def bitmask_scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    """The grammar-bitmask kernel over float32 and bf16 logits (qwen3's vocabulary)."""
    import torch

    from lanner.kernels.token_bitmask import apply_token_bitmask

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.empty(256, 151936, dtype=dtype)
        bitmask = torch.empty(4, 151936 // 32, dtype=torch.int32)
        rows = torch.empty(4, dtype=torch.int64)
        yield (
            f"apply_token_bitmask {dtype}",
            partial(apply_token_bitmask, logits, bitmask, rows, rows),
        )


def quant_scenarios() -> Iterator[tuple[str, Callable[[], object]]]:
    """The quantized linears' variants. Decode (skinny_matmul): fp8/int8 W8A8 (rows
    quantized in the kernel, by their own absmax or, on a row-parallel rank, a given
    one) and W8A16 in each activation dtype, both inner products, with and without
    split-K and bias; W4A16 in each activation dtype, every group size (steps of 16 to
    128 words a plane), zero points or not, split-K or not, and the configs
    benchmarks/kernels_linear.py --quant --sweep tries; the int4 GEMV (one row by rule,
    2-16 rows forced, the candidates benchmarks/gemv_w4.py sweeps). Batches: the tiled W4A16 kernel
    (64 and 128 rows, split-K), the int4 dequantizer, the row quantizer (own or given
    absmax) and the tiled W8A8 kernel on pre-quantized rows. (fp32 activations, for
    tests and references, take the exact "ieee" dot, whose variants are the slowest to
    compile: the decode ones only.)"""
    import torch

    from benchmarks.gemv_w4 import gemv_sweep
    from benchmarks.kernels_quant import SKINNY_SWEEP
    from benchmarks.tune_quant import grid_for
    from lanner.kernels import skinny_matmul, w4a16_matmul, w8a8_matmul

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    fp8, int8 = torch.float8_e4m3fn, torch.int8

    def int4_operands(n: int, k: int, group: int, dtype: torch.dtype, zero_points: bool):
        packed = torch.empty(n, -(-k // 512) * 64, dtype=torch.int32)
        scales = torch.empty(-(-k // group), n, dtype=fp16 if dtype == fp16 else bf16)
        zeros = torch.empty(scales.shape, dtype=torch.uint8) if zero_points else None
        return packed, scales, zeros

    def int4_call(fn, dtype, m: int, n: int, k: int, group: int, zero_points: bool, **options):
        """``fn`` (an int4 linear: x, packed, scales, zeros, group, bias) on empty
        operands of that shape; zero-point cases carry a bias too."""
        packed, scales, zeros = int4_operands(n, k, group, dtype, zero_points)
        bias = torch.empty(n, dtype=dtype) if zero_points else None
        x = torch.empty(m, k, dtype=dtype)
        return partial(fn, x, packed, scales, zeros, group, bias, **options)

    # (dtype, rows, (N, K), group, zero points): llama3-8b's qkv (split-K at 1 row),
    # gate_up and down (K = 14336: 28 tiles), the LM head, qwen3-0.6b's qkv.
    w4_decode_cases = [
        (bf16, 1, (6144, 4096), 128, False),
        (bf16, 16, (28672, 4096), 32, True),
        (bf16, 8, (4096, 14336), 64, False),
        (bf16, 1, (128256, 4096), 128, False),
        (bf16, 4, (4096, 1024), 16, True),
        (bf16, 2, (6144, 4096), 256, True),
        (fp16, 1, (6144, 4096), 128, True),
        (fp16, 8, (4096, 14336), 32, False),
        (fp32, 4, (4096, 1024), 128, False),
    ]
    for dtype, m, (n, k), group, zero_points in w4_decode_cases:
        # The weights scaled in registers (a tuned option) as well as the exact default.
        for scaled in (False, True) if dtype != fp32 else (False,):
            yield (
                f"skinny w4 {dtype} {m}x{n}x{k} group {group} zeros {zero_points} "
                f"scale_weights {scaled}",
                int4_call(
                    skinny_matmul.skinny_matmul_w4,
                    dtype,
                    m,
                    n,
                    k,
                    group,
                    zero_points,
                    scale_weights=scaled,
                ),
            )
    packed, scales, _ = int4_operands(6144, 4096, 128, bf16, False)
    # The configs kernels_linear.py --sweep and tune_quant.py try (what a tuned table holds).
    int4_sweep = SKINNY_SWEEP["int4"] + grid_for(skinny_matmul.INT4, 16)
    for options in int4_sweep:
        yield (
            f"skinny w4 bf16 8x6144x4096 sweep {options}",
            partial(
                skinny_matmul.skinny_matmul_w4,
                torch.empty(8, 4096, dtype=bf16),
                packed,
                scales,
                None,
                128,
                **options,
            ),
        )
    # The int4 GEMV (kernels/int4_gemv.py): what skinny_matmul_w4 runs for one row by
    # rule, in each activation dtype and group size, zero points or not, W1's shapes
    # (the down projection's 2-warp steps); forced at 2-16 rows (a tuned GEMV config for
    # rows 16); the separate split-K reduce; and every candidate benchmarks/gemv_w4.py
    # sweeps (what a tuned table's int4-gemv entries hold).
    gemv_cases = [
        (bf16, 1, (6144, 4096), 128, False, {}),
        (bf16, 1, (4096, 14336), 128, True, {}),
        (bf16, 1, (28672, 4096), 32, True, {}),
        (fp16, 1, (4096, 4096), 64, False, {}),
        (fp32, 1, (1024, 3072), 128, True, {}),
        (bf16, 1, (4100, 4096), 128, True, {}),  # N off the rows a program: clamped scales
        (bf16, 1, (4096, 1024), 16, False, {"fused_reduce": False, "split_k": 2}),
        (bf16, 2, (6144, 4096), 128, False, {"gemv": True}),
        (bf16, 4, (4096, 14336), 128, False, {"gemv": True}),
        (bf16, 8, (28672, 4096), 128, True, {"gemv": True}),
        (bf16, 16, (4096, 4096), 128, False, {"gemv": True}),
    ]
    for dtype, m, (n, k), group, zero_points, options in gemv_cases:
        yield (
            f"int4 gemv {dtype} {m}x{n}x{k} group {group} zeros {zero_points} {options}",
            int4_call(
                skinny_matmul.skinny_matmul_w4, dtype, m, n, k, group, zero_points, **options
            ),
        )
    for n, k in ((4096, 4096), (4096, 14336)):
        packed, scales, _ = int4_operands(n, k, 128, bf16, False)
        for options in gemv_sweep(k):
            yield (
                f"int4 gemv bf16 1x{n}x{k} sweep {options}",
                partial(
                    skinny_matmul.skinny_matmul_w4,
                    torch.empty(1, k, dtype=bf16),
                    packed,
                    scales,
                    None,
                    128,
                    **options,
                ),
            )
    # fp8 W8A8 at one row with the L2 prefetch of the first weight tiles (SkinnyConfig.
    # prefetch, what benchmarks/gemv_w4.py puts into a table where it measures faster).
    for n, k in ((6144, 4096), (4096, 14336)):
        yield (
            f"skinny w8 fp8 bf16 1x{n}x{k} prefetch",
            partial(
                skinny_matmul.skinny_matmul_w8,
                torch.empty(1, k, dtype=bf16),
                torch.empty(n, k, dtype=fp8),
                torch.empty(n),
                None,
                448.0,
                prefetch=True,
            ),
        )
    # (weight dtype, activation dtype, rows, (N, K)): split-K at (4096, 4096), bias at 8 rows
    w8_decode_cases = [
        (fp8, bf16, 1, (4096, 4096)),
        (fp8, bf16, 8, (28672, 4096)),
        (fp8, bf16, 1, (4096, 14336)),
        (fp8, bf16, 1, (128256, 4096)),
        (fp8, fp16, 16, (6144, 4096)),
        (fp8, fp16, 1, (6144, 4096)),
        (fp8, fp32, 3, (6144, 4096)),
        (int8, bf16, 1, (4096, 14336)),
        (int8, bf16, 8, (6144, 4096)),
        (int8, fp16, 2, (4096, 4096)),
    ]
    for weight_dtype, dtype, m, (n, k) in w8_decode_cases:
        weight, w_scale = torch.empty(n, k, dtype=weight_dtype), torch.empty(n)
        bias = torch.empty(n, dtype=dtype) if m == 8 else None
        # W8A8 (rows quantized in the kernel: what the model runs; or by quantize_rows
        # first: prequantize), W8A8 by each row's absmax given (a row-parallel rank's,
        # max-reduced over the ranks), both, and W8A16.
        qmax = 448.0 if weight_dtype == fp8 else 127.0
        variants = [(qmax, None, False), (qmax, None, True), (qmax, torch.empty(m), False)]
        variants += [(qmax, torch.empty(m), True), (None, None, False)]
        for x_qmax, absmax, prequantize in variants:
            yield (
                f"skinny w8 {weight_dtype} {dtype} {m}x{n}x{k} x_qmax {x_qmax} "
                f"given absmax {absmax is not None} prequantize {prequantize}",
                partial(
                    skinny_matmul.skinny_matmul_w8,
                    torch.empty(m, k, dtype=dtype),
                    weight,
                    w_scale,
                    bias,
                    x_qmax,
                    row_absmax=absmax,
                    prequantize=prequantize,
                ),
            )
    weight, w_scale = torch.empty(6144, 4096, dtype=fp8), torch.empty(6144)
    for m in (1, 8):
        # (The sweep runs the elementwise products at one row only.)
        fp8_sweep = SKINNY_SWEEP["fp8"] + grid_for(skinny_matmul.FP8, m)
        for options in [o for o in fp8_sweep if m == 1 or o["use_dot"]]:
            yield (
                f"skinny w8 fp8 bf16 {m}x6144x4096 sweep {options}",
                partial(
                    skinny_matmul.skinny_matmul_w8,
                    torch.empty(m, 4096, dtype=bf16),
                    weight,
                    w_scale,
                    None,
                    448.0,
                    **options,
                ),
            )
    # The tiled W4A16 kernel: (dtype, rows, (N, K), group, zero points)
    w4_tiled_cases = [
        (bf16, 40, (6144, 4096), 128, True),
        (bf16, 600, (4096, 1024), 256, False),
        (bf16, 200, (28672, 4096), 32, False),
        (fp16, 300, (6144, 4096), 32, False),
    ]
    for dtype, m, (n, k), group, zero_points in w4_tiled_cases:
        yield (
            f"w4a16 tiled {dtype} {m}x{n}x{k} group {group} zeros {zero_points}",
            int4_call(w4a16_matmul.w4a16_matmul, dtype, m, n, k, group, zero_points),
        )
    for dtype, group, zero_points in ((bf16, 128, True), (fp16, 32, False), (bf16, 256, False)):
        packed, scales, zeros = int4_operands(4096, 4096, group, dtype, zero_points)
        yield (
            f"dequantize_int4 {dtype} group {group} zeros {zero_points}",
            partial(w4a16_matmul.dequantize_int4, packed, scales, zeros, group, 4096, dtype),
        )
    for weight_dtype, qmax in ((fp8, 448.0), (int8, 127.0)):
        for dtype in (bf16, fp16):
            for absmax in (None, torch.empty(300)):
                yield (
                    f"quantize_rows {weight_dtype} {dtype} given absmax {absmax is not None}",
                    partial(
                        w8a8_matmul.quantize_rows,
                        torch.empty(300, 4096, dtype=dtype),
                        weight_dtype,
                        qmax,
                        absmax,
                    ),
                )
        for m in (40, 600):
            codes, x_scale = torch.empty(m, 4096, dtype=weight_dtype), torch.empty(m)
            weight, w_scale = torch.empty(6144, 4096, dtype=weight_dtype), torch.empty(6144)
            yield (
                f"w8a8 tiled {weight_dtype} {m}x6144x4096",
                partial(w8a8_matmul.w8a8_matmul, codes, x_scale, weight, w_scale, None, bf16),
            )


def defined_kernels() -> set[str]:
    """``*_kernel`` jit functions of lanner.kernels: what engine_scenarios must launch."""
    import lanner.kernels

    found = set()
    for info in pkgutil.iter_modules(lanner.kernels.__path__, "lanner.kernels."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
                found.add(name)
    return found


def force_programmatic_launch() -> None:
    """On the H100 every launch asks for programmatic dependent launch (lanner.kernels.pdl),
    which CPU tensors never do: compile the variants the GPU runs."""
    import lanner.kernels

    for info in pkgutil.iter_modules(lanner.kernels.__path__, "lanner.kernels."):
        module = importlib.import_module(info.name)
        if hasattr(module, "launch_options"):
            module.launch_options = lambda tensor: {"PDL": True, "launch_pdl": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON summary")
    parser.add_argument(
        "--known-bad", action="store_true", help="launch only this module's bad kernels"
    )
    parser.add_argument("--stop-after", default=STOP_AFTER, help="last compile stage to run")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes"
    )
    args = parser.parse_args(argv)
    if triton.knobs.runtime.interpret:
        sys.exit("unset TRITON_INTERPRET: under it @triton.jit gives interpreter functions")

    start = time.perf_counter()
    force_programmatic_launch()
    recorder = CompileRecorder()
    scenarios: list[tuple[str, Callable[[], object]]] = []
    if args.known_bad:
        scenarios.append(("known-bad kernels", launch_known_bad_kernels))
    else:
        scenarios.extend(engine_scenarios())
        scenarios.extend(skinny_scenarios())
        scenarios.extend(quant_scenarios())
        scenarios.extend(bitmask_scenarios())

    run = triton.runtime.JITFunction.run
    triton.runtime.JITFunction.run = lambda kernel, *a, **kw: recorder.run(kernel, *a, **kw)
    try:
        for name, call in scenarios:
            with recorder.scenario_named(name):
                call()
    finally:
        triton.runtime.JITFunction.run = run
    variants = recorder.compile_all(args.stop_after, args.jobs)
    summary = {
        "target": TARGET,
        "stop_after": args.stop_after,
        "seconds": round(time.perf_counter() - start, 2),
        "compile_seconds": round(sum(v["seconds"] for v in variants), 2),
        "scenarios": len(scenarios),
        "defined_kernels": sorted(defined_kernels()) if not args.known_bad else [],
        "compiled_kernels": sorted({v["kernel"] for v in variants if v["error"] is None}),
        "variants": variants,
        "failures": [v for v in variants if v["error"] is not None],
        "scenario_errors": recorder.scenario_errors,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1, default=repr))


# -- tests ---------------------------------------------------------------------------------


def run_harness(tmp_path: Path, *args: str) -> dict:
    """The harness in a subprocess, outside the interpreter, with an empty Triton cache."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed: nothing to compile for sm_90 with")
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp_path, prefix="triton-cache-")
    command = [sys.executable, "-m", "tests.kernels.test_compile_for_hopper", "--out", str(out)]
    done = subprocess.run(
        [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0 and out.exists(), f"harness failed:\n{done.stdout}{done.stderr}"
    return json.loads(out.read_text())


def describe(variant: dict) -> str:
    return (
        f"{variant['module']}.{variant['kernel']} {variant['signature']} "
        f"constexprs={variant['constexprs']} num_warps={variant['num_warps']} "
        f"(launched by: {'; '.join(variant['scenarios'][:3])})\n{variant['error']}"
    )


def test_every_launched_kernel_variant_compiles_for_sm90(tmp_path: Path) -> None:
    summary = run_harness(tmp_path)
    failures = [describe(v) for v in summary["failures"]]
    assert not failures, "\n\n".join(failures)
    errors = [f"{e['scenario']}:\n{e['error']}" for e in summary["scenario_errors"]]
    assert not errors, "wrappers failed before launching:\n" + "\n".join(errors)
    compiled = set(summary["compiled_kernels"])
    assert compiled >= REQUIRED_KERNELS, REQUIRED_KERNELS - compiled
    # A kernel that no scenario launches is never checked: it needs a scenario above.
    unlaunched = set(summary["defined_kernels"]) - compiled
    assert not unlaunched, f"add scenarios that launch {sorted(unlaunched)}"
    assert len(summary["variants"]) >= 40, len(summary["variants"])
    # Verification's acceptance compiles once (twice with decided drafts) for every batch
    # and k <= 7, and once more each past it: no variant appears mid-run.
    accept = [v for v in summary["variants"] if v["kernel"] == "_accept_drafts_kernel"]
    assert len(accept) == 4, [describe(v) for v in accept]
    # A decode graph's unpack compiles once whatever the engine's graph sizes (the startup's
    # compile-ahead sizes its graphs otherwise), once more for the draft chain's tables.
    unpack = [v for v in summary["variants"] if v["kernel"] == "_unpack_graph_inputs_kernel"]
    assert len(unpack) == 2, [describe(v) for v in unpack]
    assert all(v["reached"] == STOP_AFTER for v in summary["variants"])


def test_harness_rejects_what_the_interpreter_accepts(tmp_path: Path) -> None:
    """Both bad kernels run under the interpreter (when this process has it), and the
    harness reports both as compile failures."""
    if triton.knobs.runtime.interpret:
        launch_known_bad_kernels()  # raises nothing: the interpreter accepts them
    summary = run_harness(tmp_path, "--known-bad")
    errors = {v["kernel"]: v["error"] for v in summary["failures"]}
    assert set(errors) == {"_bad_dead_branch_kernel", "_bad_plain_global_kernel"}, summary
    assert "seed.dtype.is_int()" in errors["_bad_dead_branch_kernel"]
    assert "_PLAIN_GLOBAL" in errors["_bad_plain_global_kernel"]
    assert not summary["scenario_errors"], summary["scenario_errors"]


if __name__ == "__main__":
    main()
