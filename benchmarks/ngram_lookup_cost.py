"""The n-gram proposer's search on the host (CPU; no GPU needed): ``ngram_lookup``'s time a
call at batch sizes 1 to 256 over code-like histories, and, with ``--baseline FILE`` (an
older lanner/spec/ngram.py), that version's too, alternating in one process, after
checking that both propose the same tokens on random batches. Then the whole proposer's
time a step at batches 1 and 4 (W7-like: 256-token prompts, 5 tokens accepted a step, 50
steps), with each request's n-gram index (what batches up to SMALL_BATCH use) and with the
batched search. A speculating step is read before the next is scheduled, so this search
adds to every n-gram step's wall time.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/ngram_lookup_cost.py \\
        [--baseline old_ngram.py] [--commit SHA]

Writes benchmarks/results/<stamp>-ngram-lookup-cost.json and prints µs per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lanner.bench.report import save_copies
from lanner.spec import ngram
from lanner.spec.config import SpeculativeConfig
from lanner.spec.ngram import NgramProposer, ngram_lookup

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 512), (1, 2048), (4, 1024), (16, 512), (64, 512), (256, 512)]


def code_like(rng: np.random.Generator, length: int) -> np.ndarray:
    """Tokens that repeat locally, as code does: two thirds of each 8-token piece drawn
    from a small set, the rest fresh."""
    common = rng.integers(0, 8192, 64)
    pieces = [
        common[rng.integers(0, 64, 8)] if i % 3 else rng.integers(0, 8192, 8)
        for i in range(length // 8)
    ]
    return np.concatenate(pieces).astype(np.int32)


def load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_ngram", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.ngram_lookup


def same_proposals(first, second, trials: int = 2000) -> None:
    rng = random.Random(0)
    for trial in range(trials):
        histories = [
            np.array([rng.randrange(rng.randint(1, 8)) for _ in range(rng.randint(0, 80))])
            for _ in range(rng.randint(1, 12))
        ]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 6)
        ks = [rng.randint(1, 7) for _ in histories]
        args = ([h.astype(np.int32) for h in histories], min_n, max_n, ks)
        if first(*args) != second(*args):
            raise SystemExit(f"the two versions propose differently (trial {trial}): {args}")


def time_call(lookup, histories: list[np.ndarray], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        lookup(histories, 2, 5, [5] * len(histories))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


class _Slot:
    """What NgramProposer reads of a ProposalSlot."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.num_draft_slots = 5
        self.state = type("State", (), {"proposer": None})()

    @property
    def num_known_tokens(self) -> int:
        return len(self.tokens)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def time_proposer(batch: int, small_batch: int, steps: int = 50) -> float:
    """Median µs of NgramProposer.propose a step, each request growing by 5 tokens a step
    from a 256-token prompt, with ngram.SMALL_BATCH set to ``small_batch``."""
    rng = np.random.default_rng(1)
    histories = [code_like(rng, 512).tolist() for _ in range(batch)]
    slots = [_Slot(h[:256]) for h in histories]
    proposer = NgramProposer(
        SpeculativeConfig.from_value(
            {
                "method": "ngram",
                "num_speculative_tokens": 5,
                "prompt_lookup_max": 5,
                "prompt_lookup_min": 2,
            }
        )
    )
    saved, ngram.SMALL_BATCH = ngram.SMALL_BATCH, small_batch
    samples = []
    try:
        for step in range(steps):
            start = time.perf_counter()
            proposer.propose(slots, None)  # type: ignore[arg-type]
            samples.append(time.perf_counter() - start)
            for slot, history in zip(slots, histories, strict=True):
                slot.tokens = history[: 256 + 5 * (step + 1)]
    finally:
        ngram.SMALL_BATCH = saved
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="an older lanner/spec/ngram.py to time beside")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    versions = {"current": ngram_lookup}
    if args.baseline:
        versions["baseline"] = load(args.baseline)
        same_proposals(ngram_lookup, versions["baseline"])
    rng = np.random.default_rng(0)
    rows = []
    for batch, length in SHAPES:
        histories = [code_like(rng, length) for _ in range(batch)]
        best = {name: float("inf") for name in versions}
        for _ in range(args.rounds):  # alternating, the best of each version's rounds
            for name, lookup in versions.items():
                best[name] = min(best[name], time_call(lookup, histories, 100))
        rows.append({"batch": batch, "history": length, "us_per_call": best})
        line = "  ".join(f"{name} {us:8.1f} µs" for name, us in best.items())
        print(f"batch {batch:3}, {length:4} tokens each: {line}", flush=True)
    proposer_rows = []
    for batch in (1, 4):
        best = {"index": float("inf"), "batched search": float("inf")}
        for _ in range(args.rounds):
            best["index"] = min(best["index"], time_proposer(batch, batch))
            best["batched search"] = min(best["batched search"], time_proposer(batch, 0))
        proposer_rows.append({"batch": batch, "propose_us_per_step": best})
        line = "  ".join(f"{name} {us:8.1f} µs" for name, us in best.items())
        print(f"proposer, batch {batch}: {line}", flush=True)
    save_copies(
        {
            "workload": "n-gram lookup on the host",
            "card": f"CPU: {platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores",
            "commit": args.commit,
            "command": "PYTHONPATH=. python3 benchmarks/ngram_lookup_cost.py "
            + " ".join(sys.argv[1:]),
            "rows": rows,
            "proposer_rows": proposer_rows,
        },
        RESULTS,
        f"{time.strftime('%Y%m%d-%H%M%S')}-ngram-lookup-cost.json",
    )


if __name__ == "__main__":
    main()
