"""Where a speculation-enabled engine's plain steps spend host time beyond a plain
engine's: the demo model at batch 4 (W7's held-out prompts, three waves of 256 output
tokens), every mode's core built in one process and their runs alternated round by round
(as spec_idle_cost.py --interleaved). ``*-forced0`` modes are the adaptive settings with
the policy's plan forced to 0, so every step is plain and only the bookkeeping of an
enabled proposer differs from plain decoding. Prints, per mode, the median over rounds of
the paired tok/s ratio to plain, the median step, and the microseconds a step spends in
the policy (plan, begin_step, step_done), the proposer's idle(), the scheduler and the
runner's launch and collect.

    PYTHONPATH=. python3 benchmarks/spec_plain_step_parts.py --pin-core 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.spec_decode import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    add_pin_argument,
    make_core,
    pin_to_core,
    run,
    time_calls,
)
from benchmarks.spec_idle_cost import OUTPUT_LEN, batch_prompts, speculative_config  # noqa: E402

MODES = [
    "plain",
    "ngram-off",
    "ngram-forced0",
    "draft-forced0",
    "eagle-forced0",
    "eagle-adaptive",
    "draft-adaptive",
]
ADAPTIVE = {
    "ngram-forced0": "ngram-adaptive",
    "draft-forced0": "draft-adaptive",
    "eagle-forced0": "eagle-adaptive",
}
PARTS = ("plan", "begin_step", "step_done", "idle", "schedule", "launch", "collect")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--waves", type=int, default=3)
    add_pin_argument(parser)
    args = parser.parse_args()
    pin_to_core(args.pin_core)
    prompts = batch_prompts(args.batch, args.waves)
    cores, seconds = {}, {}
    for mode in MODES:
        core = make_core(
            str(DEFAULT_MODEL_DIR), args.batch, speculative_config(ADAPTIVE.get(mode, mode))
        )
        seconds[mode] = dict.fromkeys(PARTS, 0.0)
        if core.spec is not None:
            if mode.endswith("forced0"):
                core.spec.policy.plan = lambda num_running: 0
            for name in ("plan", "begin_step", "step_done"):
                time_calls(core.spec.policy, name, seconds[mode], name)
            time_calls(core.spec.proposer, "idle", seconds[mode], "idle")
        time_calls(core.scheduler, "schedule", seconds[mode], "schedule")
        time_calls(core.runner, "launch", seconds[mode], "launch")
        time_calls(core.runner, "collect", seconds[mode], "collect")
        run(core, prompts, OUTPUT_LEN, 0.0)  # untimed: one-time costs
        cores[mode] = core
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        shift = round_ % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            spent = seconds[mode]
            for name in spent:
                spent[name] = 0.0
            result = run(cores[mode], prompts, OUTPUT_LEN, 0.0)
            steps = result["steps"]
            results[mode].append(
                {
                    "tok_s": round(result["output_tok_per_s"]),
                    "step_ms_median": round(result["step_ms_median"], 4),
                    "steps": steps,
                    "us_per_step": {k: round(v / steps * 1e6, 1) for k, v in spent.items()},
                }
            )
    for mode in MODES:
        print(mode, json.dumps(results[mode]))
    for mode in MODES:
        runs = results[mode]
        paired = statistics.median(
            a["tok_s"] / b["tok_s"] for a, b in zip(runs, results["plain"], strict=True)
        )
        step = statistics.median(a["step_ms_median"] for a in runs)
        parts = {k: statistics.median(a["us_per_step"][k] for a in runs) for k in PARTS}
        print(f"SUMMARY {mode:16s} paired {paired:.3f} step_ms_median {step:.4f} us/step {parts}")


if __name__ == "__main__":
    main()
