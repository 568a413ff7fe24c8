"""What a speculation-enabled engine's plain steps cost against a plain engine's, each
engine alone in a fresh process (W7's benchmark runs several cores side by side in one):
the demo model, W7's held-out prompts, 256 output tokens, at the batch sizes given, for
plain decoding, n-gram configured but switched off (``disable_by_batch_size: 1``), and
n-gram adaptive. Prints one line per (mode, batch): output tok/s, median step, and the
steps that speculated.

    PYTHONPATH=. python3 benchmarks/spec_idle_cost.py --batches 4,64 [--mode MODE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {
    "plain": None,
    "ngram-off": {
        "method": "ngram",
        "num_speculative_tokens": 6,
        "disable_by_batch_size": 1,
    },
    "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 6},
}


def child(mode: str, batches: list[int]) -> None:
    from benchmarks.spec_decode import DEFAULT_MODEL_DIR, heldout_prompts, make_core, release, run

    prompts, _ = heldout_prompts(64)
    for batch in batches:
        count = max(32, batch)
        batch_prompts = [prompts[i % len(prompts)] for i in range(count)]
        core = make_core(str(DEFAULT_MODEL_DIR), batch, MODES[mode])
        run(core, batch_prompts, 256, 0.0)  # untimed: one-time costs
        result = run(core, batch_prompts, 256, 0.0)
        spec = core.spec.policy.stats if core.spec is not None else None
        print(
            json.dumps(
                {
                    "mode": mode,
                    "batch": batch,
                    "output_tok_per_s": round(result["output_tok_per_s"]),
                    "step_ms_median": round(result["step_ms_median"], 3),
                    "steps": result["steps"],
                    "speculative_steps": spec.num_speculative_steps if spec else 0,
                }
            ),
            flush=True,
        )
        release(core)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="4,64")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.mode:
        child(args.mode, batches)
        return
    for mode in MODES:
        subprocess.run(
            [sys.executable, __file__, "--batches", args.batches, "--mode", mode], check=False
        )


if __name__ == "__main__":
    main()
