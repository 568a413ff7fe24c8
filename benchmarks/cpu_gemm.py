"""The CPU's float32 (or, with --dtype bfloat16, bf16) GEMMs on the demo model's linears,
as a decode step runs them: every layer's own weights (so each is read from memory, not
from a cache a repeated weight would sit in), eight layers of qkv / o / gate_up / down
plus the LM head, at several row counts, through each of F.linear and the packed GEMMs of
kernels/cpu_linear.py (MKL's, oneDNN's). Rounds are interleaved so the machine's other
load falls on every backend. One thread unless --threads. Also records what
cpu_linear.chosen() picks here.

With --engine-prompts, the whole engine too: the demo model generating 128 greedy tokens
for that many prompts under each LANNER_CPU_GEMM setting (torch, mkl, onednn, auto), one
engine, the settings interleaved round by round, TPOT per run and the greedy tokens
compared.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_gemm.py --engine-prompts 1,8,32 \
        --commit $(git rev-parse --short HEAD)

Writes benchmarks/results/<stamp>-cpu-gemm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lanner.bench.report import cpu_name, new_result, save_stamped  # noqa: E402
from lanner.engine.config import DEFAULT_MODEL_DIR  # noqa: E402
from lanner.kernels import cpu_linear  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def demo_linear_shapes() -> tuple[list[tuple[int, int]], int, tuple[int, int]]:
    """(out, in) of one layer's four linears, the layer count, and the LM head's shape."""
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    layer = [
        ((heads + 2 * kv_heads) * head_dim, hidden),
        (hidden, heads * head_dim),
        (2 * inter, hidden),
        (hidden, inter),
    ]
    return layer, config["num_hidden_layers"], (config["vocab_size"], hidden)


def step_weights(
    generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    layer, layers, head = demo_linear_shapes()
    weights = [torch.randn(*shape, generator=generator) for _ in range(layers) for shape in layer]
    return [w.to(dtype) for w in [*weights, torch.randn(*head, generator=generator)]]


def multipliers(dtype: torch.dtype) -> dict[str, Any]:
    """name -> (pack, multiply) for F.linear and every packed GEMM usable here for dtype."""
    found: dict[str, Any] = {"torch": (lambda w: None, lambda x, p, w, rows: F.linear(x, w))}
    for gemm in cpu_linear.usable_backends(dtype):
        found[gemm.name] = (
            gemm.pack,
            lambda x, p, w, rows, gemm=gemm: gemm.multiply(x, p, w, None, rows),
        )
    return found


def measure(rows_list: list[int], rounds: int, dtype: torch.dtype) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    weights = step_weights(generator, dtype)
    backends = multipliers(dtype)
    packed = {name: [pack(w) for w in weights] for name, (pack, _) in backends.items()}
    figures: dict[str, Any] = {}
    for rows in rows_list:
        inputs = {
            k: torch.randn(rows, k, generator=generator).to(dtype)
            for k in {w.shape[1] for w in weights}
        }
        samples: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for name, (_, multiply) in backends.items():
                started = time.perf_counter()
                for weight, copy in zip(weights, packed[name], strict=True):
                    multiply(inputs[weight.shape[1]], copy, weight, rows)
                samples[name].append((time.perf_counter() - started) * 1e3)
        for name, times in samples.items():
            times = times[1:]
            figures[f"{name}/rows{rows}"] = {
                "step_linears_ms": {"median": statistics.median(times), "min": min(times)},
                "samples_ms": times,
            }
            median = statistics.median(times)
            print(f"  rows {rows:3d}  {name:7s} median {median:7.2f} ms  min {min(times):7.2f}")
    return figures


def lanner_step_linears_ms(rows: int, rounds: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The median time of one decode step's linears at ``rows`` rows through
    cpu_linear.linear (the GEMMs lanner chose here), each weight read from memory: with
    nothing else in the step, the fastest a ``dtype`` step of lanner's could be."""
    generator = torch.Generator().manual_seed(0)
    weights = step_weights(generator, dtype)
    widths = {weight.shape[1] for weight in weights}
    inputs = {width: torch.randn(rows, width, generator=generator).to(dtype) for width in widths}
    times = []
    for _ in range(rounds + 1):  # the first round packs and warms up, and is dropped
        started = time.perf_counter()
        for weight in weights:
            cpu_linear.linear(inputs[weight.shape[1]], weight, None)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[1:])


def measure_engine(prompt_counts: list[int], rounds: int, dtype: torch.dtype) -> dict[str, Any]:
    """TPOT of one engine under each LANNER_CPU_GEMM setting, interleaved."""
    from lanner import LLM, SamplingParams

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cpu_vs_hf import PROMPTS

    llm = LLM(dtype=dtype, device="cpu", max_num_seqs=max(prompt_counts))
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    settings = [cpu_linear.TORCH, *(g.name for g in cpu_linear.usable_backends(dtype)), "auto"]
    samples: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    previous = os.environ.get(cpu_linear.CHOICE_ENV)
    try:
        for _ in range(rounds + 1):  # the first round packs and warms up, and is dropped
            for setting in settings:
                os.environ[cpu_linear.CHOICE_ENV] = setting
                cpu_linear.chosen.cache_clear()
                for count in prompt_counts:
                    started = time.perf_counter()
                    outputs = llm.generate(PROMPTS[:count], params, use_tqdm=False)
                    tpot_ms = (time.perf_counter() - started) / 128 * 1e3
                    key = f"{setting}/prompts{count}"
                    samples.setdefault(key, []).append(tpot_ms)
                    tokens[key] = [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        if previous is None:
            os.environ.pop(cpu_linear.CHOICE_ENV, None)
        else:
            os.environ[cpu_linear.CHOICE_ENV] = previous
        cpu_linear.chosen.cache_clear()
    figures: dict[str, Any] = {}
    for key, times in samples.items():
        times = times[1:]
        setting, count = key.split("/prompts")
        figures[key] = {
            "step_ms": {"median": statistics.median(times), "min": min(times)},
            "samples_ms": times,
            "greedy_equal_to_torch": tokens[key] == tokens[f"torch/prompts{count}"],
        }
        print(
            f"  engine, {count:>2} prompts, {setting:6s} median "
            f"{statistics.median(times):6.2f} ms a step  min {min(times):6.2f}"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--engine-prompts", default="", help="e.g. 1,8,32: the engine too")
    parser.add_argument("--engine-rounds", type=int, default=4)
    parser.add_argument("--commit", default=None, help="recorded in the JSON")
    args = parser.parse_args(argv)
    if args.commit:
        os.environ["LANNER_COMMIT"] = args.commit
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",") if r]
    dtype = getattr(torch, args.dtype)
    figures = measure(rows_list, args.rounds, dtype)
    engine_counts = [int(c) for c in args.engine_prompts.split(",") if c]
    engine = measure_engine(engine_counts, args.engine_rounds, dtype) if engine_counts else {}
    picked = cpu_linear.chosen(dtype).names()
    print(f"  cpu_linear.chosen() here: {picked}")
    result = new_result("cpu-gemm", DEFAULT_MODEL_DIR.name)
    result.update(
        cpu=cpu_name(),
        threads=args.threads,
        dtype=args.dtype,
        torch=torch.__version__,
        rounds=args.rounds,
        chosen=picked,
        figures=figures,
        engine=engine,
    )
    save_stamped(result, RESULTS, "cpu-gemm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
