"""Tensor parallelism on two GPUs (issue 18): W1 TPOT and W4 output tok/s at TP=1 and TP=2
in the same call, the all-reduce time of a TP=2 decode step from a profile, and the greedy
tokens of TP=2 against TP=1 over 256 steps on the 8B shape (random bf16 weights).

Run on the two-GPU machine from the repository root (about 4-5 minutes):
    PYTHONPATH=. python3 benchmarks/tensor_parallel_gpu.py --commit $(git rev-parse --short HEAD)
--parts picks a subset (default W1,W4,parity). One JSON per part in benchmarks/results/
(and $OUT). NVLink multicast stays off (the GPU machine's notes): the variables below are
set before torch loads, and the workers (forked from this process's forkserver) inherit
them.
"""

from __future__ import annotations

import os

# Before torch or NCCL is loaded, in this process and so in every worker it starts.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(MULTICAST_OFF)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks.engine_workloads import (  # noqa: E402
    RESULTS,
    compare_greedy,
    greedy_tokens,
    make_core,
    offline,
    random_prompt,
    release,
)
from lanner.bench.report import save_copies  # noqa: E402
from lanner.engine.request import Request  # noqa: E402
from lanner.sampling_params import SamplingParams  # noqa: E402

SHAPE = "llama3-8b"


def collective_ms_per_step(core, steps: int) -> dict:
    """torch.profiler over ``steps`` decode steps of rank 0: the device time of the NCCL
    kernels (the all-reduces of o_proj and down_proj, the logits' all-gather) per step."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            core.step()
    torch.cuda.synchronize()
    nccl: dict[str, float] = {}
    total_us = 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0.0)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total_us += device_us
        if "nccl" in event.key.lower() and device_us > 0:
            nccl[event.key[:80]] = nccl.get(event.key[:80], 0.0) + device_us
    return {
        "profiled_steps": steps,
        "nccl_kernel_ms_per_step": sum(nccl.values()) / steps / 1e3,
        "all_kernel_ms_per_step": total_us / steps / 1e3,
        "nccl_kernels_ms_per_step": {k: v / steps / 1e3 for k, v in nccl.items()},
    }


def w1(tp: int) -> dict:
    """W1: one request, 128-token prompt, 256 greedy tokens (the second of two runs is
    timed); at TP=2 a third request's decode steps are profiled for the collectives."""
    core = make_core(SHAPE, max_num_seqs=8, tensor_parallel_size=tp)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    step_times: list[float] = []
    for repeat in range(2):
        core.add_request(Request(f"r{repeat}", random_prompt(rng, 128, 32000), params))
        times = []
        while core.has_unfinished_requests():
            before = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - before)
        step_times = times[1:]
    weight_bytes = sum(p.numel() * p.element_size() for p in core.loaded.model.parameters())
    profile = {}
    if tp > 1:
        core.add_request(Request("profiled", random_prompt(rng, 128, 32000), params))
        for _ in range(20):
            core.step()
        profile = collective_ms_per_step(core, 50)
        while core.has_unfinished_requests():
            core.step()
    release(core)
    tpot = statistics.median(step_times)
    return {
        "tpot_median_ms": tpot * 1e3,
        "tpot_p99_ms": sorted(step_times)[int(0.99 * len(step_times))] * 1e3,
        "tokens_per_s": 1 / tpot,
        "rank0_weight_bytes": weight_bytes,
        **profile,
    }


def w4(tp: int) -> dict:
    rng = random.Random(0)
    prompts = [random_prompt(rng, 1000, 128256) for _ in range(500)]
    params = [SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)] * 500
    figures = offline(
        SHAPE,
        prompts,
        params,
        240,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        tensor_parallel_size=tp,
    )
    keep = ("requests", "output_tokens", "seconds", "output_tok_per_s", "total_tok_per_s")
    return {k: figures[k] for k in (*keep, "preemptions", "timed_out") if k in figures}


def parity(steps: int = 256) -> dict:
    """TP=2's greedy tokens against TP=1's: 4 requests, ``steps`` greedy steps each; where
    they part, TP=1's top-2 margin there (bf16 near-ties part them legitimately)."""
    rng = random.Random(1)
    prompts = [random_prompt(rng, n, 128256) for n in (17, 128, 300, 1000)]
    one = greedy_tokens(prompts, steps, max_num_seqs=8)
    two = greedy_tokens(prompts, steps, max_num_seqs=8, tensor_parallel_size=2)
    return compare_greedy(one, two)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="W1,W4,parity")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    card = torch.cuda.get_device_name()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "parity":
            figures = {"tp2_vs_tp1": parity()}
        else:
            run = {"W1": w1, "W4": w4}[part]
            figures = {"tp1": run(1), "tp2": run(2)}
            if part == "W1":
                figures["tp2_over_tp1_tpot"] = (
                    figures["tp2"]["tpot_median_ms"] / figures["tp1"]["tpot_median_ms"]
                )
            else:
                figures["tp2_over_tp1_tok_s"] = (
                    figures["tp2"]["output_tok_per_s"] / figures["tp1"]["output_tok_per_s"]
                )
        result = {
            "workload": f"tp-{part}",
            "card": card,
            "gpus": torch.cuda.device_count(),
            "commit": args.commit,
            "command": f"PYTHONPATH=. python3 benchmarks/tensor_parallel_gpu.py --parts {part}",
            "environment": {name: os.environ.get(name) for name in MULTICAST_OFF},
            **figures,
            "wall_s": time.perf_counter() - started,
        }
        save_copies(result, RESULTS, f"{stamp}-tp-{part}.json")
        print(f"{part}: {json.dumps(figures, default=str)}", flush=True)


if __name__ == "__main__":
    main()
