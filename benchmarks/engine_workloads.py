"""The named engine workloads W1-W4 (benchmarks/WORKLOADS.md) on random bf16 weights,
plus the GPU parity check of the fast path (Triton kernels + CUDA graphs) against the
eager reference path.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/engine_workloads.py --workloads parity,W1,W2,W3,W4
Each workload writes one JSON file to benchmarks/results/ (and $OUT when set).
--quantization METHOD gives every engine quantized random weights (fp8, int8: quantized
while loading; gptq, awq: random 4-bit codes, group 128). W8-decode runs W1 with bf16,
fp8 and int4 (gptq) weights in one call (speed-ups over bf16, each against its floor:
the matmul bytes as loaded over the copy bandwidth measured in the same call);
parity-quant checks the quantized fast path against the quantized eager reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton

from lanner.bench.report import save_copies
from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.request import Request
from lanner.kernels import attention_metadata, ops
from lanner.sampling_params import SamplingParams

if TYPE_CHECKING:
    from benchmarks.step_phases import StepPhases

SHAPES = Path(__file__).resolve().parent / "shapes"
RESULTS = Path(__file__).resolve().parent / "results"


# Options every engine of this run gets (--kv-cache-dtype).
RUN_OPTIONS: dict[str, object] = {}

# Triton kernel variants built (or loaded from Triton's disk cache) since the process
# began: one inside a timed run is a compile landing in some request's latency.
COMPILED: list[str] = []


def _note_compile(*, fn, compile, **_) -> None:
    constants = {k[0] if isinstance(k, tuple) else k: v for k, v in compile["constants"].items()}
    shown = {k: v for k, v in constants.items() if isinstance(v, (int, bool))}
    COMPILED.append(f"{fn.name}{shown}")


triton.knobs.runtime.jit_post_compile_hook = _note_compile

# Python's full (generation 2) collections: how many, and the time they held the host.
GC_PAUSES: list[float] = []
_gc_started: list[float] = []


def _time_gc(phase: str, info: dict) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        GC_PAUSES.append(time.perf_counter() - _gc_started[0])


gc.callbacks.append(_time_gc)


def make_core(shape: str, **options) -> EngineCore:
    options.setdefault("max_model_len", 4096)
    options = {**RUN_OPTIONS, **options}
    config = EngineConfig.from_kwargs(
        model=str(SHAPES / shape),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        **options,
    )
    return EngineCore(config)


def release(core: EngineCore) -> None:
    core.shutdown()
    del core
    gc.collect()
    torch.cuda.empty_cache()


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


def single_stream(shape: str, enforce_eager: bool, **options) -> dict:
    """W1/W2: one request, 128-token prompt, 256 greedy tokens; TPOT from step times."""
    core = make_core(shape, max_num_seqs=8, enforce_eager=enforce_eager, **options)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    step_times: list[float] = []
    for repeat in range(2):  # the first run warms up
        core.add_request(Request(f"r{repeat}", random_prompt(rng, 128, 32000), params))
        started = time.perf_counter()
        times, ttft = [], None
        while core.has_unfinished_requests():
            before = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - before)
            ttft = ttft or time.perf_counter() - started
        step_times = times[1:]
    weight_bytes = sum(p.numel() * p.element_size() for p in core.loaded.model.parameters())
    matmul_bytes = core.loaded.matmul_weight_bytes
    quantization = core.loaded.quant_config.describe() if core.loaded.quant_config else None
    release(core)
    tpot = statistics.median(step_times)
    return {
        "tpot_median_ms": tpot * 1e3,
        "tokens_per_s": 1 / tpot,
        "ttft_ms": ttft * 1e3,
        "tpot_p99_ms": sorted(step_times)[int(0.99 * len(step_times))] * 1e3,
        "weight_bytes": weight_bytes,
        # What a decode step reads of weights: the linears as stored and the LM head.
        "matmul_weight_bytes": matmul_bytes,
        "quantization": quantization,
    }


def w8_decode(enforce_eager: bool, methods: list[str | None]) -> dict:
    """W8's W1 rows: W1 with each weight method, speed-up over bf16, and each run's TPOT
    against its floor (matmul bytes read per token over the copy bandwidth)."""
    from lanner.bench.roofline import copy_rate

    bandwidth = copy_rate()
    torch.cuda.empty_cache()
    figures: dict[str, dict] = {}
    for method in methods:
        run = single_stream("llama3-8b", enforce_eager, quantization=method)
        run["floor_ms"] = run["matmul_weight_bytes"] / bandwidth * 1e3
        run["bandwidth_share"] = run["floor_ms"] / run["tpot_median_ms"]
        figures[method or "bf16"] = run
        print(f"  W1 {method or 'bf16'}: {json.dumps({k: v for k, v in run.items()})}", flush=True)
    base = figures.get("bf16")
    for run in figures.values():
        if base:
            run["speedup_over_bf16"] = run["tokens_per_s"] / base["tokens_per_s"]
    return {
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "runs": figures,
        "targets": {"fp8": 1.75, "gptq": 2.8},
    }


def time_by_batch(timeline: list[tuple[int, float]]) -> dict[str, dict]:
    """Steps and seconds by how many requests were running: a long tail of small
    batches shows up as many cheap steps, a KV-bound full batch as few costly ones."""
    buckets = ((192, 10**9), (128, 191), (64, 127), (16, 63), (1, 15), (0, 0))
    summary = {}
    for low, high in buckets:
        times = [t for n, t in timeline if low <= n <= high]
        if times:
            summary[f"{low}-{high}" if high < 10**9 else f">={low}"] = {
                "steps": len(times),
                "seconds": round(sum(times), 3),
                "ms_per_step": round(sum(times) / len(times) * 1e3, 3),
            }
    return summary


def run_offline(
    core: EngineCore,
    prompts: list[list[int]],
    params: list[SamplingParams],
    time_limit_s: float = float("inf"),
    phases: StepPhases | None = None,
) -> dict:
    """Submit all at once to a built core; time until the last finishes (prefill included).
    With ``phases``, its per-phase host breakdown of the steps at >= 192 running requests
    joins the result."""
    for i, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(Request(f"x{i}-{time.monotonic_ns()}", prompt, param))
    torch.cuda.synchronize()
    compiled_before, gc_before = len(COMPILED), len(GC_PAUSES)
    started = last = time.perf_counter()
    output_tokens = steps = 0
    timed_out = False
    timeline = []  # (running requests, seconds) per step: where in the run the time goes
    if phases is not None:
        phases.reset()
    while core.has_unfinished_requests():
        running = len(core.scheduler.running)
        if phases is not None and running >= 192:
            phases.begin_step()
        output_tokens += sum(len(out.new_token_ids) for out in core.step())
        if phases is not None and running >= 192:
            phases.end_step()
            phases.pause()
        steps += 1
        now = time.perf_counter()
        timeline.append((running, now - last))
        last = now
        if now - started > time_limit_s:
            timed_out = True
            break
    elapsed = time.perf_counter() - started
    slowest = sorted(range(len(timeline)), key=lambda i: -timeline[i][1])[:8]
    return {
        "seconds": elapsed,
        "output_tokens": output_tokens,
        "steps": steps,
        "time_by_running_requests": time_by_batch(timeline),
        "slowest_steps": [
            {"step": i, "running": timeline[i][0], "ms": round(timeline[i][1] * 1e3, 2)}
            for i in sorted(slowest)
        ],
        "kernels_compiled_during_run": COMPILED[compiled_before:],
        "full_gc_pauses_ms": [round(t * 1e3, 1) for t in GC_PAUSES[gc_before:]],
        "output_tok_per_s": output_tokens / elapsed,
        "timed_out": timed_out,
        **(
            {"host_phases_at_192_plus_running": phases.summary(), "gc_heap": gc_heap()}
            if phases is not None
            else {}
        ),
    }


def gc_heap(top: int = 10) -> dict:
    """What a full collection scans now: the collector's objects by generation (frozen
    ones apart) and the commonest types among them."""
    objects = gc.get_objects()
    types: dict[str, int] = {}
    for obj in objects:
        name = type(obj).__qualname__
        types[name] = types.get(name, 0) + 1
    common = sorted(types.items(), key=lambda item: -item[1])[:top]
    return {
        "by_generation": [len(gc.get_objects(g)) for g in range(3)],
        "frozen": gc.get_freeze_count(),
        "commonest_types": dict(common),
    }


def offline(
    shape: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    time_limit_s: float,
    **options,
) -> dict:
    """W3/W4: a fresh engine, all requests submitted at once."""
    core = make_core(shape, **options)
    result = run_offline(core, prompts, params, time_limit_s)
    preemptions = core.scheduler.num_preemptions
    release(core)
    input_tokens = sum(len(p) for p in prompts)
    return {
        "requests": len(prompts),
        **result,
        "total_tok_per_s": (result["output_tokens"] + input_tokens) / result["seconds"],
        "preemptions": preemptions,
    }


def w3(enforce_eager: bool) -> dict:
    rng = random.Random(0)
    lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    prompts = [random_prompt(rng, n_in, 151936) for n_in, _ in lengths]
    params = [
        SamplingParams(temperature=0.6, max_tokens=n_out, ignore_eos=True, seed=i)
        for i, (_, n_out) in enumerate(lengths)
    ]
    return offline(
        "qwen3-0.6b",
        prompts,
        params,
        300,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        enforce_eager=enforce_eager,
    )


W10_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "integer"},
    },
    "required": ["name", "tags", "score"],
}


def synthetic_vocabulary(size: int) -> list[bytes]:
    """``size`` distinct token strings shaped like a BPE vocabulary (the shape models ship
    no tokenizer): printable ASCII, then words of 2-10 letters, digits and punctuation,
    half with a leading space; the constraint's per-token work scales with these."""
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz" * 4 + "ETAOINSHRD0123456789_.,:;'\"(){}[]-"
    tokens = [bytes([b]) for b in range(32, 127)] + [b"\n", b"\t"]
    seen = set(tokens)
    while len(tokens) < size:
        word = "".join(rng.choices(letters, k=rng.randint(2, 10)))
        token = (" " + word if rng.random() < 0.5 else word).encode()
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    return tokens


W10_W2_ROUNDS = 5  # timed rounds of W2's free/schema pair, after one warm-up round


def w10(enforce_eager: bool, with_phases: bool = False) -> dict:
    """W10: W3 with every request under one JSON schema against W3 free, and W2 with a
    schema against W2 free (its TPOT), each pair on one engine built once. With
    ``with_phases`` (--phases) each run's host time by phase (benchmarks/step_phases.py)
    joins it: W3's over its steps at >= 192 running requests, W2's over its last round's
    decode steps."""
    from lanner.sampling_params import StructuredOutputsParams

    rng = random.Random(0)
    lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    prompts = [random_prompt(rng, n_in, 151936) for n_in, _ in lengths]
    constraint = StructuredOutputsParams(json=W10_SCHEMA)
    core = make_core(
        "qwen3-0.6b", max_num_seqs=256, max_num_batched_tokens=8192, enforce_eager=enforce_eager
    )
    # Qwen3's 151,643 tokens (the rest of the 151,936 rows are padding).
    core.structured_outputs.use_vocabulary(synthetic_vocabulary(151643))
    phases = None
    if with_phases:
        from benchmarks.step_phases import StepPhases

        phases = StepPhases(core)
    result: dict = {}
    if phases is not None:
        from lanner.engine.structured_output import fill_threads

        result["fill_threads"] = fill_threads()  # the batch fill's, on this machine
    for name, structured in (("free", None), ("json_schema", constraint)) * 2:
        params = [
            SamplingParams(
                temperature=0.6, max_tokens=n_out, ignore_eos=True, seed=i,
                structured_outputs=structured,
            )
            for i, (_, n_out) in enumerate(lengths)
        ]  # fmt: skip
        result[f"W3_{name}"] = run_offline(core, prompts, params, 300, phases)  # second kept
    free, constrained = result["W3_free"], result["W3_json_schema"]
    result["W3_throughput_ratio"] = constrained["output_tok_per_s"] / free["output_tok_per_s"]
    # W2's pair alternates over rounds (the first a warm-up), each run's TPOT its steps'
    # median, the pair's the median of its rounds': the device machine's host speed drifts
    # by a quarter between runs, which one run of each would read as the constraint's cost.
    per_round: dict[str, list[float]] = {"free": [], "json_schema": []}
    for round_index in range(W10_W2_ROUNDS + 1):
        for name, structured in (("free", None), ("json_schema", constraint)):
            params = SamplingParams(
                temperature=0.0, max_tokens=256, ignore_eos=True, structured_outputs=structured
            )
            request_id = f"w2-{name}-{time.monotonic_ns()}"
            core.add_request(Request(request_id, prompts[0][:128], params))
            times = []
            last_round = round_index == W10_W2_ROUNDS
            if phases is not None:
                phases.reset()
            while core.has_unfinished_requests():
                counted = phases is not None and last_round and bool(times)  # not the prefill
                before = time.perf_counter()
                if counted:
                    phases.begin_step()
                out = core.step()
                if counted:
                    phases.end_step()
                    phases.pause()
                times.append(time.perf_counter() - before)
            if round_index:
                per_round[name].append(statistics.median(times[1:]) * 1e3)
            if last_round:
                result[f"W2_{name}"] = {
                    "tpot_median_ms": statistics.median(per_round[name]),
                    "tpot_median_ms_per_round": per_round[name],
                    "steps": len(times),
                    "last_output": [o.new_token_ids[-4:] for o in out],
                }
                if phases is not None:
                    result[f"W2_{name}"]["host_phases"] = phases.summary()
    result["W2_tpot_ratio"] = (
        result["W2_json_schema"]["tpot_median_ms"] / result["W2_free"]["tpot_median_ms"]
    )
    result["W2_tpot_ratio_per_round"] = [
        c / f for f, c in zip(per_round["free"], per_round["json_schema"], strict=True)
    ]
    if phases is not None:
        phases.close()
    result["sampling_graphs_check"] = sampling_graphs_check(core, prompts[:4], constraint)
    release(core)
    return result


def sampling_graphs_check(core: EngineCore, prompts: list[list[int]], constraint) -> dict:
    """The sampling graphs against the eager sampler on one engine: 4 requests at once
    (greedy and seeded at temperature 0.6, free and under the schema), 64 tokens each,
    with the graphs and without them; every token must agree (the same logits meet the
    same kernel)."""
    sampler = core.runner.sampler
    if not hasattr(sampler, "graphs"):
        return {"captured": False, "all_equal": None}  # a lanner before the sampling graphs
    graphs = sampler.graphs

    def tokens() -> dict[str, list[int]]:
        kinds = [(0.0, None), (0.0, constraint), (0.6, None), (0.6, constraint)]
        out: dict[str, list[int]] = {}
        for i, (prompt, (temperature, structured)) in enumerate(zip(prompts, kinds, strict=True)):
            params = SamplingParams(
                temperature=temperature, seed=i, max_tokens=64, ignore_eos=True,
                structured_outputs=structured,
            )  # fmt: skip
            core.add_request(Request(f"check{i}", prompt[:128], params))
            out[f"check{i}"] = []
        while core.has_unfinished_requests():
            for o in core.step():
                out[o.request_id] += o.new_token_ids
        return out

    with_graphs = tokens()
    sampler.graphs = None
    try:
        eager = tokens()
    finally:
        sampler.graphs = graphs
    return {
        "captured": graphs is not None,
        "all_equal": with_graphs == eager,
        "tokens_per_request": [len(t) for t in with_graphs.values()],
    }


def w4(enforce_eager: bool) -> dict:
    rng = random.Random(0)
    prompts = [random_prompt(rng, 1000, 128256) for _ in range(500)]
    params = [SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)] * 500
    return offline(
        "llama3-8b",
        prompts,
        params,
        240,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        enforce_eager=enforce_eager,
    )


def w6() -> dict:
    """256 requests of 2048 input / 128 output tokens whose first 0-90 % is one shared
    prefix: throughput with prefix caching on over off."""
    shares = (0, 25, 50, 75, 90)
    rng = random.Random(0)
    workloads = {}
    for share in shares:
        shared = random_prompt(rng, 2048 * share // 100, 128256)
        workloads[share] = [
            shared + random_prompt(rng, 2048 - len(shared), 128256) for _ in range(256)
        ]
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    figures: dict[str, dict] = {}
    for caching in (False, True):
        core = make_core(
            "llama3-8b",
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            enable_prefix_caching=caching,
        )
        run_offline(core, workloads[0][:8], [params] * 8)  # warm up
        for share in shares:
            core.reset_prefix_cache()
            result = run_offline(core, workloads[share], [params] * len(workloads[share]))
            figures.setdefault(f"{share}%", {})["on" if caching else "off"] = result
        release(core)
        del core  # free this engine's memory before the next one allocates
        gc.collect()
        torch.cuda.empty_cache()
    for row in figures.values():
        row["speedup"] = row["on"]["output_tok_per_s"] / row["off"]["output_tok_per_s"]
    return figures


def multi_turn_chat() -> dict:
    """32 conversations x 4 turns on the 8B shape: a 512-token system prompt shared by
    all, then per turn a 64-token user message and 64 generated tokens; each turn's
    prompt is the whole conversation so far. Mean TTFT per turn, caching off and on."""
    rng = random.Random(0)
    system = random_prompt(rng, 512, 128256)
    user_turns = [[random_prompt(rng, 64, 128256) for _ in range(4)] for _ in range(32)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    figures: dict[str, list[float]] = {}
    for caching in (False, True):
        core = make_core(
            "llama3-8b", max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=caching
        )
        history = [list(system) for _ in range(32)]
        turn_ttft = []
        for turn in range(4):
            added = {}
            for c in range(32):
                history[c] += user_turns[c][turn]
                rid = f"c{c}-t{turn}"
                core.add_request(Request(rid, list(history[c]), params))
                added[rid] = time.perf_counter()
            first: dict[str, float] = {}
            outputs: dict[str, list[int]] = {rid: [] for rid in added}
            while core.has_unfinished_requests():
                for out in core.step():
                    if out.new_token_ids and out.request_id not in first:
                        first[out.request_id] = time.perf_counter() - added[out.request_id]
                    outputs[out.request_id] += out.new_token_ids
            for c in range(32):
                history[c] += outputs[f"c{c}-t{turn}"]
            turn_ttft.append(statistics.mean(first.values()) * 1e3)
        figures["on" if caching else "off"] = turn_ttft
        release(core)
        del core
        gc.collect()
        torch.cuda.empty_cache()
    return {"mean_ttft_ms_per_turn": figures}


def greedy_tokens(prompts: list[list[int]], max_tokens: int, **options) -> tuple[dict, dict]:
    """Greedy tokens and top-2 logprobs of every prompt, all submitted at once."""
    core = make_core("llama3-8b", **options)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    for i, prompt in enumerate(prompts):
        core.add_request(Request(f"p{i}", prompt, params))
    tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    logprobs: dict[str, list] = {f"p{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.new_logprobs
    release(core)
    return tokens, logprobs


def compare_greedy(reference: tuple[dict, dict], candidate: tuple[dict, dict]) -> dict:
    """Where two runs' greedy tokens part, the reference's top-2 logprob margin at that
    step tells a bf16 near-tie from a real disagreement."""
    (ref_tokens, ref_lp), (new_tokens, new_lp) = reference, candidate
    report: dict[str, dict] = {}
    all_margins: list[float] = []
    max_logprob_diff = 0.0
    for rid in ref_tokens:
        margins = [lp.top[0][1] - lp.top[1][1] for lp in ref_lp[rid]]
        all_margins += margins
        pairs = list(zip(ref_tokens[rid], new_tokens[rid], strict=True))
        split = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        agree = len(pairs) if split is None else split
        for a, b in zip(ref_lp[rid][:agree], new_lp[rid][:agree], strict=True):
            max_logprob_diff = max(max_logprob_diff, abs(a.logprob - b.logprob))
        report[rid] = {
            "first_divergence": split,
            "reference_top2_margin_there": None if split is None else margins[split],
        }
    parted = [r for r in report.values() if r["first_divergence"] is not None]
    return {
        "requests": report if len(report) <= 8 else f"{len(parted)} of {len(report)} parted",
        "all_equal": not parted,
        "max_margin_where_parted": max(
            (r["reference_top2_margin_there"] for r in parted), default=None
        ),
        "max_sampled_logprob_diff_while_equal": max_logprob_diff,
        "median_reference_top2_margin": statistics.median(all_margins),
    }


def parity(steps: int = 256, **options) -> dict:
    """The fast path (Triton + CUDA graphs) vs the eager reference path on the 8B shape:
    4 requests, 256 greedy steps each."""
    rng = random.Random(1)
    prompts = [random_prompt(rng, n, 128256) for n in (17, 128, 300, 1000)]
    ops.FORCE_REFERENCE = True
    reference = greedy_tokens(prompts, steps, max_num_seqs=8, enforce_eager=True, **options)
    ops.FORCE_REFERENCE = False
    return compare_greedy(reference, greedy_tokens(prompts, steps, max_num_seqs=8, **options))


def parity_quant(methods: list[str]) -> dict:
    """parity for quantized weights: per method, the Triton kernels (skinny decode, prefill
    paths) + CUDA graphs against the pure-torch quantized reference, 64 greedy steps."""
    return {method: parity(64, quantization=method) for method in methods}


def parity_cascade() -> dict:
    """Cascade attention at engine level: 64 requests sharing a 1024-token prefix (plus
    64 tokens of their own), 64 greedy steps, with the cascade vs without it."""
    rng = random.Random(2)
    shared = random_prompt(rng, 1024, 128256)
    prompts = [shared + random_prompt(rng, 64, 128256) for _ in range(64)]
    saved = attention_metadata.CASCADE_MIN_SEQS
    attention_metadata.CASCADE_MIN_SEQS = 1 << 30  # no batch qualifies: plain decode
    try:
        plain = greedy_tokens(prompts, 64, max_num_seqs=64)
    finally:
        attention_metadata.CASCADE_MIN_SEQS = saved
    return compare_greedy(plain, greedy_tokens(prompts, 64, max_num_seqs=64))


def cprofile_steps(core: EngineCore, steps: int, rows: int) -> tuple[float, str]:
    """Run ``steps`` engine steps under cProfile: ms per step and the top ``rows`` by
    own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        core.step()
    profiler.disable()
    per_step_ms = (time.perf_counter() - started) / steps * 1e3
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return per_step_ms, text.getvalue()


def profile_kernels(shape: str, requests: int, prompt_len: int, temperature: float) -> dict:
    """torch.profiler over 10 decode steps of ``requests`` running requests: the CUDA
    kernels that take the step's time (calls / 10 = launches per step), then cProfile
    of the host side of 10 more steps."""
    core = make_core(shape, max_num_seqs=max(8, requests), max_num_batched_tokens=8192)
    rng = random.Random(0)
    params = SamplingParams(temperature=temperature, max_tokens=400, ignore_eos=True)
    for i in range(requests):
        core.add_request(Request(f"w{i}", random_prompt(rng, prompt_len, 32000), params))
    # Prefill (8,192 tokens a step), then settle into decode.
    for _ in range(math.ceil(requests * prompt_len / 8192) + 8):
        core.step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            core.step()
    step_ms = (time.perf_counter() - started) / 10 * 1e3
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    print(table)
    host_step_ms, text = cprofile_steps(core, 10, 22)
    release(core)
    print(text[-5000:])
    return {"step_ms_under_torch_profiler": step_ms, "step_ms_under_cprofile": host_step_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", default="parity,W1,W2,W3,W4")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    parser.add_argument(
        "--quantization", default=None, help="weights of every engine: fp8, int8, gptq or awq"
    )
    parser.add_argument(
        "--w8-methods", default="bf16,fp8,gptq", help="W8-decode / parity-quant methods"
    )
    parser.add_argument(
        "--skinny-configs",
        default="",
        help="JSON of measured skinny_matmul configs (kernels_linear.py --quant --sweep "
        "--tuned-out) installed before any engine is built",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="W10: each run's host time per step phase (benchmarks/step_phases.py)",
    )
    args = parser.parse_args()
    RUN_OPTIONS["kv_cache_dtype"] = args.kv_cache_dtype
    tuned = 0
    if args.skinny_configs:
        from benchmarks.kernels_quant import install_tuned

        tuned = install_tuned(args.skinny_configs)
        print(f"installed {tuned} tuned skinny_matmul configs from {args.skinny_configs}")
    if args.quantization:
        RUN_OPTIONS["quantization"] = args.quantization
    w8_methods = [None if m == "bf16" else m for m in args.w8_methods.split(",")]
    card = torch.cuda.get_device_name()
    runners = {
        "parity": parity,
        "parity-cascade": parity_cascade,
        "W1": lambda: single_stream("llama3-8b", args.enforce_eager),
        "W2": lambda: single_stream("qwen3-0.6b", args.enforce_eager),
        "W3": lambda: w3(args.enforce_eager),
        "W4": lambda: w4(args.enforce_eager),
        "W10": lambda: w10(args.enforce_eager, args.phases),
        "W6": w6,
        # W3-like: 256 requests at ~600-token contexts; W1/W2: one request.
        "profile-W3": lambda: profile_kernels("qwen3-0.6b", 256, 600, 0.6),
        "profile-W2": lambda: profile_kernels("qwen3-0.6b", 1, 128, 0.0),
        "profile-W1": lambda: profile_kernels("llama3-8b", 1, 128, 0.0),
        # W4-like: 256 running requests at ~1,500-token contexts.
        "profile-W4": lambda: profile_kernels("llama3-8b", 256, 1400, 0.0),
        "chat": multi_turn_chat,
        "W8-decode": lambda: w8_decode(args.enforce_eager, w8_methods),
        "parity-quant": lambda: parity_quant([m for m in w8_methods if m]),
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in args.workloads.split(","):
        started = time.perf_counter()
        figures = runners[name]()
        result = {
            "workload": name,
            "card": card,
            "commit": args.commit,
            "command": "PYTHONPATH=. python3 benchmarks/engine_workloads.py "
            f"--workloads {name} --kv-cache-dtype {args.kv_cache_dtype}"
            + (f" --quantization {args.quantization}" if args.quantization else "")
            + (f" --w8-methods {args.w8_methods}" if name.startswith(("W8", "parity-q")) else "")
            + (" --enforce-eager" if args.enforce_eager else "")
            + (f" --skinny-configs {args.skinny_configs}" if args.skinny_configs else ""),
            "tuned_skinny_configs": tuned,
            "path": "reference"
            if ops.FORCE_REFERENCE
            else "triton" + ("" if args.enforce_eager else " + cuda graphs"),
            "kv_cache_dtype": args.kv_cache_dtype,
            "quantization": args.quantization,
            # Programmatic dependent launch (lanner/kernels/pdl.py), off with LANNER_PDL=0.
            "programmatic_launch": os.environ.get("LANNER_PDL", "1") != "0",
            **figures,
            "wall_s": time.perf_counter() - started,
        }
        save_copies(result, RESULTS, f"{stamp}-{name}.json")
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
        print(f"{name}: {json.dumps(shown)}", flush=True)


if __name__ == "__main__":
    main()
