"""GPU baseline of the eager reference path: dummy-load time and W1/W2 decode speed.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/gpu_baseline.py --commit $(git rev-parse HEAD)
Writes one JSON per workload to benchmarks/results/ (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.request import Request
from lanner.model.loader import load_model
from lanner.sampling_params import SamplingParams

SHAPES = Path(__file__).resolve().parent / "shapes"
RESULTS = Path(__file__).resolve().parent / "results"


def time_dummy_load(shape: str) -> dict:
    torch.cuda.synchronize()
    started = time.perf_counter()
    loaded = load_model(SHAPES / shape, dtype="bfloat16", device="cuda", load_format="dummy")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    del loaded
    torch.cuda.empty_cache()
    return {"seconds": seconds, "weight_bytes": weight_bytes}


def decode_workload(shape: str, prompt_len: int, output_len: int) -> dict:
    """One request, greedy, ignore_eos: per-step decode time (TPOT) through the engine core."""
    config = EngineConfig.from_kwargs(
        model=str(SHAPES / shape),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_model_len=prompt_len + output_len + 16,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
    )
    core = EngineCore(config)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, core.model_config.vocab_size, (prompt_len,), generator=generator)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in core.loaded.model.parameters())
    step_times = []
    for repeat in range(2):  # the first run warms up
        core.add_request(Request(f"w{repeat}", prompt.tolist(), params))
        started = time.perf_counter()
        ttft = None
        times = []
        while core.has_unfinished_requests():
            before = time.perf_counter()
            core.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - before)
            if ttft is None:
                ttft = time.perf_counter() - started
        step_times = times[1:]  # decode steps only
    tpot = statistics.median(step_times)
    del core
    torch.cuda.empty_cache()
    return {
        "ttft_ms": ttft * 1e3,
        "tpot_median_ms": tpot * 1e3,
        "tpot_p90_ms": sorted(step_times)[int(0.9 * len(step_times))] * 1e3,
        "tokens_per_s": 1 / tpot,
        "weight_bytes": weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    command = "PYTHONPATH=. python3 benchmarks/gpu_baseline.py"
    common = {
        "card": card,
        "commit": args.commit,
        "command": command,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "path": "eager reference (pure torch)",
    }
    results = {
        "dummy-load-8b": {
            "workload": "dummy-load",
            "model": "llama3-8b",
            **time_dummy_load("llama3-8b"),
            **common,
        }
    }
    for name, shape in (("W1", "llama3-8b"), ("W2", "qwen3-0.6b")):
        figures = decode_workload(shape, prompt_len=128, output_len=256)
        floor_ms = figures["weight_bytes"] / bandwidth * 1e3
        results[name] = {
            "workload": name,
            "model": shape,
            **figures,
            "floor_ms": floor_ms,
            "share_of_floor": floor_ms / figures["tpot_median_ms"],
            **common,
        }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, result in results.items():
        save_copies(result, RESULTS, f"{stamp}-{name}-baseline.json")
    print(f"{'run':<16}{'figure':>40}")
    for name, result in results.items():
        shown = {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in result.items()
            if k not in common
        }
        print(f"{name:<16}{json.dumps(shown)}")
    print(f"card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
