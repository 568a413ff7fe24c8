"""What a speculation-enabled engine's plain steps cost against a plain engine's, each
engine alone in a fresh process (W7's benchmark runs several cores side by side in one):
the demo model, W7's held-out prompts, 256 output tokens, at the batch sizes given, for
plain decoding, n-gram configured but switched off (``disable_by_batch_size: 1``), and
n-gram adaptive (``--modes`` adds the demo draft model's and EAGLE head's adaptive
settings, ``draft-adaptive`` and ``eagle-adaptive``). Prints one line per (mode, batch,
repeat): output tok/s, median step, and the steps that speculated. With ``--repeats R``
every mode runs R times, the modes' order rotating each round (one fresh process each),
and the summary gives per (mode, batch)
the median tok/s and its ratio to plain's: the demo model's steps are bound by the host,
whose speed moved by up to 25 % between processes in one run (20261201-2045), so one
process per mode cannot tell a real cost from that. ``--interleaved`` builds every mode's
core in one process instead and alternates their runs (``vs_plain_paired_median``: the
median of each round's ratio to plain's in that round), and each spec line says what the
adaptive rule measured and chose (per batch bucket) and how often it speculated while the
batch was full.

    PYTHONPATH=. python3 benchmarks/spec_idle_cost.py --batches 4,64 --repeats 3 \
        --commit $(git rev-parse --short HEAD)

A batch-16 run of one wave of prompts lasts ~0.1 s on an H200, where one host hiccup
moves its rate by a third: ``--waves W`` gives each timed run W batches' worth of
prompts (the batch refills as a wave ends), and ``--pin-core`` keeps the engine on one
core (host_costs.py --probe-cores names the fastest). With equal output lengths a plain
batch finishes together and refills in one prefill, while speculating requests finish a
few steps apart and refill one by one: ``--length-spread F`` draws each request's output
length (seeded, the same for every mode) from OUTPUT_LEN x [1 - F, 1 + F], so plain
decoding's batch refills one by one too, as a server's does.

Writes <stamp>-spec-idle-cost.json (benchmarks/results/ and $OUT).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.spec_decode import add_pin_argument, pin_to_core  # noqa: E402
from lanner.bench.report import new_result, save_copies  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUTPUT_LEN = 256  # tokens per request
LENGTH_SPREAD = 0.0  # --length-spread


def output_lengths(count: int) -> list[int]:
    """Each of ``count`` requests' output length: OUTPUT_LEN, or with LENGTH_SPREAD a
    seeded draw from OUTPUT_LEN x [1 - spread, 1 + spread] (the same list every call)."""
    low = max(1, round(OUTPUT_LEN * (1 - LENGTH_SPREAD)))
    high = max(low, round(OUTPUT_LEN * (1 + LENGTH_SPREAD)))
    draw = random.Random(0)
    return [draw.randint(low, high) for _ in range(count)]


MODES = {
    "plain": None,
    "ngram-off": {
        "method": "ngram",
        "num_speculative_tokens": 6,
        "disable_by_batch_size": 1,
    },
    "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 6},
    # W7's adaptive settings for the two model proposers (k up to 4 and 5).
    "draft-adaptive": {"method": "draft_model", "num_speculative_tokens": 4},
    "eagle-adaptive": {"method": "eagle", "num_speculative_tokens": 5},
}
DEFAULT_MODES = "plain,ngram-off,ngram-adaptive"


def speculative_config(mode: str) -> dict | None:
    """MODES[mode], with the demo draft model or EAGLE head where the method needs one."""
    from benchmarks.spec_decode import DEMO_DRAFT, DEMO_EAGLE

    config = MODES[mode]
    if config is None or config["method"] == "ngram":
        return config
    return {**config, "model": str(DEMO_DRAFT if config["method"] == "draft_model" else DEMO_EAGLE)}


def _recording(begin_step, trace: list[tuple[int, int]]):  # noqa: ANN001, ANN202
    """``begin_step`` that also appends each step's (requests running, draft length)."""

    def recorded(num_running: int, draft_length: int) -> None:
        trace.append((num_running, draft_length))
        begin_step(num_running, draft_length)

    return recorded


def timed_run(core, mode: str, batch: int, prompts: list) -> dict:  # noqa: ANN001
    """One timed run of ``prompts`` through ``core``: the printed line's fields."""
    from benchmarks.spec_decode import run

    trace: list[tuple[int, int]] = []  # (requests running, draft length) per step
    policy = core.spec.policy if core.spec is not None else None
    if policy is not None:
        policy.begin_step = _recording(type(policy).begin_step.__get__(policy), trace)
    result = run(core, prompts, OUTPUT_LEN, 0.0, output_lengths(len(prompts)))
    line = {
        "mode": mode,
        "batch": batch,
        "output_tok_per_s": round(result["output_tok_per_s"]),
        "step_ms_median": round(result["step_ms_median"], 3),
        "steps": result["steps"],
        "host_probe_ms": result["host_probe_ms"],
    }
    if policy is not None:
        # What the rule saw and did in this run: whether it speculated while the batch
        # was full, how long the batch stayed full, the step times it measured per draft
        # length (ms, by batch bucket, since the core was built), and the acceptance.
        # (speculative_steps also counts run()'s own two-request warm-up, untimed.)
        full = [k for running, k in trace if running == min(batch, len(prompts))]
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
            # What plain and speculating steps realized of their predictions, per bucket.
            realized_share={
                str(key): [round(r.share(), 3) for r in b.realized]
                for key, b in sorted(policy.buckets.items())
            },
        )
    return line


def rotated(modes: list[str], round_: int) -> list[str]:
    """The modes' order in round ``round_``: each round starts one mode later."""
    shift = round_ % len(modes)
    return modes[shift:] + modes[:shift]


def batch_prompts(batch: int, waves: int) -> list:
    """``waves`` batches' worth of W7's held-out prompts (at least 32): the batch refills
    as each wave finishes, so a timed run lasts about ``waves`` x OUTPUT_LEN steps."""
    from benchmarks.spec_decode import heldout_prompts

    prompts, _ = heldout_prompts(64)
    return [prompts[i % len(prompts)] for i in range(max(32, batch * waves))]


def child(mode: str, batches: list[int], waves: int) -> None:
    from benchmarks.spec_decode import DEFAULT_MODEL_DIR, make_core, release, run

    for batch in batches:
        prompts = batch_prompts(batch, waves)
        core = make_core(str(DEFAULT_MODEL_DIR), batch, speculative_config(mode))
        run(core, prompts, OUTPUT_LEN, 0.0)  # untimed: one-time costs
        print(json.dumps(timed_run(core, mode, batch, prompts)), flush=True)
        release(core)


def interleaved(batches: list[int], modes: list[str], repeats: int, waves: int) -> list[dict]:
    """Every mode's core in this one process, built and warmed once per batch size, then
    their timed runs alternated round by round (the order rotating): the host's speed,
    which moves between processes and over time, falls on all modes of a round alike."""
    from benchmarks.spec_decode import DEFAULT_MODEL_DIR, make_core, release, run

    samples = []
    for batch in batches:
        prompts = batch_prompts(batch, waves)
        cores = {
            mode: make_core(str(DEFAULT_MODEL_DIR), batch, speculative_config(mode))
            for mode in modes
        }
        for core in cores.values():
            run(core, prompts, OUTPUT_LEN, 0.0)  # untimed: one-time costs
        for round_ in range(repeats):
            for mode in rotated(modes, round_):
                line = {**timed_run(cores[mode], mode, batch, prompts), "round": round_}
                print(json.dumps(line), flush=True)
                samples.append(line)
        for core in cores.values():
            release(core)
    return samples


def paired_ratios(samples: list[dict], mode: str, batch: int) -> dict:
    """Each round's tok/s over plain's in the same round, and their median: the figure a
    run's host speed cancels out of, where the modes of a round ran side by side."""
    by_round = {
        (s["mode"], s["round"]): s["output_tok_per_s"] for s in samples if s["batch"] == batch
    }
    ratios = [
        round(rate / by_round[("plain", round_)], 3)
        for (m, round_), rate in sorted(by_round.items())
        if m == mode and by_round.get(("plain", round_))
    ]
    return (
        {"vs_plain_by_round": ratios, "vs_plain_paired_median": statistics.median(ratios)}
        if ratios
        else {}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="4,64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="all modes in one process, their runs alternated (see interleaved())",
    )
    parser.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="output lengths drawn from 256 x [1 - F, 1 + F] (0: all 256)",
    )
    parser.add_argument(
        "--waves",
        type=int,
        default=2,
        help="batches' worth of prompts per timed run (at least 32 prompts in all)",
    )
    parser.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help=f"comma-separated, plain first, from {', '.join(MODES)} (default {DEFAULT_MODES})",
    )
    add_pin_argument(parser)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "plain" or not set(modes) <= set(MODES):
        parser.error(f"--modes must start with plain and name only {', '.join(MODES)}")
    batches = [int(b) for b in args.batches.split(",")]
    global LENGTH_SPREAD
    LENGTH_SPREAD = args.length_spread
    pin_to_core(args.pin_core)
    if args.mode:
        child(args.mode, batches, args.waves)
        return
    samples: list[dict] = (
        interleaved(batches, modes, args.repeats, args.waves) if args.interleaved else []
    )
    for round_ in range(0 if args.interleaved else args.repeats):
        for mode in rotated(modes, round_):
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *("--batches", args.batches, "--mode", mode, "--waves", str(args.waves)),
                    *("--length-spread", str(args.length_spread)),
                    *(("--pin-core", str(args.pin_core)) if args.pin_core is not None else ()),
                ],
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
                    **paired_ratios(samples, mode, batch),
                }
    print(json.dumps(summary, indent=1))
    result = new_result("spec-idle-cost", "demo-model")
    result.update(
        command="PYTHONPATH=. python3 benchmarks/spec_idle_cost.py " + " ".join(sys.argv[1:]),
        commit=args.commit,
        repeats=args.repeats,
        interleaved=args.interleaved,
        waves=args.waves,
        length_spread=args.length_spread,
        pin_core=args.pin_core,
        summary=summary,
        samples=samples,
    )
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-spec-idle-cost.json")


if __name__ == "__main__":
    main()
