"""What a speculation-enabled engine's plain steps cost against a plain engine's, each
engine alone in a fresh process (W7's benchmark runs several cores side by side in one):
the demo model, W7's held-out prompts, 256 output tokens, at the batch sizes given, for
plain decoding, n-gram configured but switched off (``disable_by_batch_size: 1``), and
n-gram adaptive. Prints one line per (mode, batch, repeat): output tok/s, median step, and
the steps that speculated. With ``--repeats R`` every mode runs R times, the modes' order
rotating each round (one fresh process each), and the summary gives per (mode, batch)
the median tok/s and its ratio to plain's: the demo model's steps are bound by the host,
whose speed moved by up to 25 % between processes in one run (20261201-2045), so one
process per mode cannot tell a real cost from that.

    PYTHONPATH=. python3 benchmarks/spec_idle_cost.py --batches 4,64 --repeats 3 \
        --commit $(git rev-parse --short HEAD)

Writes <stamp>-spec-idle-cost.json (benchmarks/results/ and $OUT).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lanner.bench.report import new_result, save_copies  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODES = {
    "plain": None,
    "ngram-off": {
        "method": "ngram",
        "num_speculative_tokens": 6,
        "disable_by_batch_size": 1,
    },
    "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 6},
}


def _recording(begin_step, trace: list[tuple[int, int]]):  # noqa: ANN001, ANN202
    """``begin_step`` that also appends each step's (requests running, draft length)."""

    def recorded(num_running: int, draft_length: int) -> None:
        trace.append((num_running, draft_length))
        begin_step(num_running, draft_length)

    return recorded


def child(mode: str, batches: list[int]) -> None:
    from benchmarks.spec_decode import DEFAULT_MODEL_DIR, heldout_prompts, make_core, release, run

    prompts, _ = heldout_prompts(64)
    for batch in batches:
        count = max(32, batch)
        batch_prompts = [prompts[i % len(prompts)] for i in range(count)]
        core = make_core(str(DEFAULT_MODEL_DIR), batch, MODES[mode])
        run(core, batch_prompts, 256, 0.0)  # untimed: one-time costs
        trace: list[tuple[int, int]] = []  # (requests running, draft length) per step
        policy = core.spec.policy if core.spec is not None else None
        if policy is not None:
            policy.begin_step = _recording(policy.begin_step, trace)
        result = run(core, batch_prompts, 256, 0.0)
        line = {
            "mode": mode,
            "batch": batch,
            "output_tok_per_s": round(result["output_tok_per_s"]),
            "step_ms_median": round(result["step_ms_median"], 3),
            "steps": result["steps"],
            "host_probe_ms": result["host_probe_ms"],
        }
        if policy is not None:
            # What the rule saw and did in the timed run: whether it speculated while the
            # batch was full, how long the batch stayed full, the step times it measured
            # per draft length (ms, by batch bucket), and the acceptance it got.
            full = [k for running, k in trace if running == min(batch, len(batch_prompts))]
            line.update(
                speculative_steps=sum(1 for _, k in trace if k),
                steps_at_full_batch=len(full),
                speculative_steps_at_full_batch=sum(1 for k in full if k),
                mean_acceptance_length=result.get("mean_acceptance_length"),
                measured_step_ms={
                    str(key): {str(k): round(t * 1e3, 3) for k, t in sorted(b.seconds.items())}
                    for key, b in sorted(policy.buckets.items())
                },
                choices={str(key): b.choice for key, b in sorted(policy.buckets.items())},
            )
        print(json.dumps(line), flush=True)
        release(core)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="4,64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.mode:
        child(args.mode, batches)
        return
    modes = list(MODES)
    samples: list[dict] = []
    for round_ in range(args.repeats):
        order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
        for mode in order:
            done = subprocess.run(
                [sys.executable, __file__, "--batches", args.batches, "--mode", mode],
                check=False,
                capture_output=True,
                text=True,
            )
            sys.stderr.write(done.stderr[-2000:] if done.returncode else "")
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    print(line, flush=True)
                    samples.append({**json.loads(line), "round": round_})
    summary = {}
    for batch in batches:
        rates = {
            mode: [
                s["output_tok_per_s"] for s in samples if s["mode"] == mode and s["batch"] == batch
            ]
            for mode in modes
        }
        plain = statistics.median(rates["plain"]) if rates["plain"] else None
        for mode, values in rates.items():
            if values:
                median = statistics.median(values)
                summary[f"{mode}/batch{batch}"] = {
                    "output_tok_per_s_median": median,
                    "samples": values,
                    "vs_plain": round(median / plain, 3) if plain else None,
                }
    print(json.dumps(summary, indent=1))
    result = new_result("spec-idle-cost", "demo-model")
    result.update(
        command="PYTHONPATH=. python3 benchmarks/spec_idle_cost.py " + " ".join(sys.argv[1:]),
        commit=args.commit,
        repeats=args.repeats,
        summary=summary,
        samples=samples,
    )
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-spec-idle-cost.json")


if __name__ == "__main__":
    main()
