"""Where a speculative step's wall time goes, against a plain step: the engine core's host
phases (schedule, propose, launch, collect, bookkeeping), a cProfile of the run, and the
device's kernel time per step from torch.profiler (so wall - device = what the host adds).

On the GPU machine, from the repository root (~2 minutes on an H200):
    PYTHONPATH=. python3 benchmarks/spec_profile.py --commit $(git rev-parse --short HEAD)
Writes benchmarks/results/<stamp>-spec-profile.json (and $OUT) and prints the tables.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spec_decode  # noqa: E402

from lanner.bench.report import card_name, save_copies  # noqa: E402
from lanner.engine.config import DEFAULT_MODEL_DIR  # noqa: E402
from lanner.engine.request import Request  # noqa: E402
from lanner.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ACTIVITY = {
    "cuda": torch.profiler.ProfilerActivity.CUDA,
    "cpu": torch.profiler.ProfilerActivity.CPU,
}


COMPILES: list[dict] = []  # every Triton specialization compiled (or read from disk)


def _log_compiles() -> None:
    """Record each JIT compile: a kernel specialization first met during the run."""
    from triton.runtime.jit import JITFunction

    original = JITFunction._do_compile

    def wrapper(self, key, signature, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, key, signature, *args, **kwargs)
        finally:
            COMPILES.append(
                {
                    "kernel": getattr(self, "__name__", str(self)),
                    "seconds": time.perf_counter() - start,
                    "signature": str(signature)[:300],
                }
            )

    JITFunction._do_compile = wrapper


def _time(event) -> float:
    """An event's device time (CUDA), or its own CPU time in a CPU smoke run."""
    return event.device_time_total if spec_decode.DEVICE == "cuda" else event.self_cpu_time_total


# With --detail, these parts of a step are timed too: (path from the core, method, label).
DETAIL = [
    ("runner", "prepare", "runner.prepare (layout, graph staging)"),
    ("runner", "_device_tokens", "runner._device_tokens (eager path)"),
    ("runner.decode_graphs", "_gather_tokens", "decode_graphs._gather_tokens"),
    ("runner", "_run_model", "runner._run_model (the model's launch)"),
    ("runner", "_launch_sample", "runner._launch_sample (sampler / verify launch)"),
    ("runner.decode_graphs", "replay", "decode_graphs.replay"),
    ("scheduler", "update_after_step", "scheduler.update_after_step"),
    ("spec.policy", "plan", "policy.plan"),
    ("spec.policy", "begin_step", "policy.begin_step"),
    ("spec.policy", "step_done", "policy.step_done"),
    ("spec.proposer", "_catch_up", "eagle: catch-up rows (host)"),
    ("spec.proposer.runner", "catch_up", "eagle: runner.catch_up"),
    ("spec.proposer.runner", "draft", "eagle: runner.draft"),
    ("", "_append_tokens", "core._append_tokens"),
    ("", "_accept_drafts", "core._accept_drafts"),
]


def _owner(core, path: str):
    owner = core
    for name in filter(None, path.split(".")):
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner


def profile_case(
    batch: int,
    spec: dict | None,
    prompts,
    output_len: int,
    use_cprofile: bool,
    device_profile_steps: int = 20,
    detail: bool = False,
) -> dict:
    model = str(DEFAULT_MODEL_DIR)
    probe_before = spec_decode.host_probe_ms()
    core = spec_decode.make_core(model, batch, spec)
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, seed=0, detokenize=False
    )
    for i in range(2):
        core.add_request(Request(f"warm{i}", list(prompts[i]), params))
    while core.has_unfinished_requests():
        core.step()
    totals: dict[str, float] = defaultdict(float)
    spec_decode.time_calls(core, "_launch", totals, "core._launch (all)")
    spec_decode.time_calls(core.scheduler, "schedule", totals, "scheduler.schedule")
    if core.spec is not None:
        spec_decode.time_calls(core, "_propose", totals, "core._propose")
        spec_decode.time_calls(core.spec.proposer, "propose", totals, "proposer.propose")
    spec_decode.time_calls(core.runner, "launch", totals, "runner.launch")
    spec_decode.time_calls(core.runner, "collect", totals, "runner.collect (waits for the device)")
    spec_decode.time_calls(core, "_collect", totals, "core._collect (all)")
    if detail:
        for path, name, label in DETAIL:
            owner = _owner(core, path)
            if owner is not None and hasattr(owner, name):
                spec_decode.time_calls(owner, name, totals, label)
    # Each step's wall time, by the draft length it was planned at.
    by_length: dict[int, list[float]] = defaultdict(list)
    plan, step = core._plan, core.step
    planned = [0]

    def planned_plan():
        planned[0] = plan()
        return planned[0]

    def timed_step():
        start = time.perf_counter()
        outputs = step()
        by_length[planned[0]].append(time.perf_counter() - start)
        return outputs

    core._plan = planned_plan
    core.step = timed_step
    for i, prompt in enumerate(prompts):
        core.add_request(Request(f"r{i}", list(prompt), params))
    steps = 0
    compiles_before = len(COMPILES)
    profiler = cProfile.Profile()
    spec_decode._sync()
    started = time.perf_counter()
    if use_cprofile:
        profiler.enable()
    while core.has_unfinished_requests():
        core.step()
        steps += 1
        if steps == 40:
            break
    if use_cprofile:
        profiler.disable()
    # Device time of a slice of steady steps (none with device_profile_steps 0: then
    # the phase times carry no profiler overhead).
    kernel_us = kernel_count = 0.0
    top_kernels: list = []
    profiled = max(device_profile_steps, 0)
    if profiled:
        with torch.profiler.profile(activities=[ACTIVITY[spec_decode.DEVICE]]) as prof:
            for _ in range(profiled):
                if not core.has_unfinished_requests():
                    break
                core.step()
                steps += 1
            spec_decode._sync()
        kernel_us = sum(_time(e) for e in prof.key_averages())
        kernel_count = sum(e.count for e in prof.key_averages())
        top_kernels = sorted(prof.key_averages(), key=lambda e: -_time(e))[:12]
    while core.has_unfinished_requests():
        core.step()
        steps += 1
    spec_decode._sync()
    elapsed = time.perf_counter() - started
    text = ""
    if use_cprofile:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
        text = stream.getvalue()
    compiles = COMPILES[compiles_before:]
    stats = core.spec.policy.stats if core.spec is not None else None
    spec_decode.release(core)
    result = {
        "batch": batch,
        "spec": spec,
        "host_probe_ms": [probe_before, spec_decode.host_probe_ms()],
        "steps": steps,
        "elapsed_s": elapsed,
        "output_tok_per_s": len(prompts) * output_len / elapsed,
        "ms_per_step": elapsed / steps * 1e3,
        "phase_ms_per_step": {k: v / steps * 1e3 for k, v in totals.items()},
        "device_profile_steps": profiled,
        "device_kernel_ms_per_step_profiled": kernel_us / max(profiled, 1) / 1e3,
        "device_kernels_per_step_profiled": kernel_count / max(profiled, 1),
        "top_kernels": [
            {
                "name": e.key[:80],
                "us_per_step": _time(e) / profiled,
                "count": e.count / profiled,
            }
            for e in top_kernels
        ],
        "mean_acceptance_length": stats.mean_acceptance_length if stats else None,
        "speculative_steps": stats.num_speculative_steps if stats else None,
        "plain_steps": stats.num_plain_steps if stats else None,
        "compiles_during_run": compiles,
        "step_ms_by_draft_length": {
            k: {
                "steps": len(v),
                "median": statistics.median(v) * 1e3,
                "total_s": sum(v),
            }
            for k, v in sorted(by_length.items())
        },
        "cprofile_first_40_steps": text,
    }
    print(
        f"== batch {batch} spec {spec and (spec['method'], spec['num_speculative_tokens'])}: "
        f"{result['output_tok_per_s']:.0f} tok/s, {result['ms_per_step']:.3f} ms/step, device "
        f"{result['device_kernel_ms_per_step_profiled']:.3f} ms/step in "
        f"{result['device_kernels_per_step_profiled']:.0f} kernels; host probe "
        f"{result['host_probe_ms'][0]:.2f} / {result['host_probe_ms'][1]:.2f} ms",
        flush=True,
    )
    for label, value in result["phase_ms_per_step"].items():
        print(f"   {label:45} {value:.3f} ms/step")
    for k, v in result["step_ms_by_draft_length"].items():
        print(
            f"   planned k={k}: {v['steps']} steps, median {v['median']:.3f} ms, "
            f"{v['total_s']:.3f} s"
        )
    for c in compiles:
        print(f"   COMPILED during the run: {c['kernel']} {c['seconds']:.3f} s {c['signature']}")
    for k in result["top_kernels"]:
        print(f"   kernel {k['name']:80} {k['us_per_step']:8.1f} us x{k['count']:.1f}")
    print("\n".join(text.splitlines()[:45]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument(
        "--cases",
        default="1:none,1:ngram6,1:draft4,16:none,16:ngram6,16:draft4",
        help="batch:method[k][a],... (a: adaptive draft length)",
    )
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--device-profile-steps",
        type=int,
        default=20,
        help="steps under torch.profiler for the device's kernel time (0: none, so the "
        "phase times carry no profiler overhead)",
    )
    parser.add_argument(
        "--detail", action="store_true", help="time the parts of a step listed in DETAIL too"
    )
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script")
    spec_decode.add_pin_argument(parser)
    args = parser.parse_args()
    spec_decode.pin_to_core(args.pin_core)
    spec_decode.DEVICE = args.device
    _log_compiles()
    prompts, _ = spec_decode.heldout_prompts(64)
    cases = []
    methods = {"ngram": "ngram", "draft": "draft_model", "eagle": "eagle"}
    for case in args.cases.split(","):
        batch_text, method = case.split(":")
        batch = int(batch_text)
        spec = None
        if method != "none":
            adaptive = method.endswith("a")
            name = method.rstrip("a0123456789")
            k = int(method[len(name) :].rstrip("a"))
            spec = spec_decode.spec_config(methods[name], k, adaptive)
        batch_prompts = (prompts * -(-batch // len(prompts)))[: max(batch * 2, 16)]
        cases.append(
            profile_case(
                batch,
                spec,
                batch_prompts,
                args.output_len,
                args.cprofile,
                args.device_profile_steps,
                args.detail,
            )
        )
    save_copies(
        {
            "workload": "spec profile, demo model",
            "card": card_name(),
            "commit": args.commit,
            "command": "PYTHONPATH=. python3 benchmarks/spec_profile.py " + " ".join(sys.argv[1:]),
            "cases": cases,
        },
        RESULTS,
        f"{time.strftime('%Y%m%d-%H%M%S')}-spec-profile.json",
    )


if __name__ == "__main__":
    main()
