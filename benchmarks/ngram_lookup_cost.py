"""The n-gram proposer's search on the host (CPU; no GPU needed): ``ngram_lookup``'s time a
call at batch sizes 1 to 256 over code-like histories, and, with ``--baseline FILE`` (an
older lanner/spec/ngram.py), that version's too, alternating in one process, after
checking that both propose the same tokens on random batches. A speculating step is read
before the next is scheduled, so this search adds to every n-gram step's wall time.

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
from lanner.spec.ngram import ngram_lookup

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
    save_copies(
        {
            "workload": "n-gram lookup on the host",
            "card": f"CPU: {platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores",
            "commit": args.commit,
            "command": "PYTHONPATH=. python3 benchmarks/ngram_lookup_cost.py "
            + " ".join(sys.argv[1:]),
            "rows": rows,
        },
        RESULTS,
        f"{time.strftime('%Y%m%d-%H%M%S')}-ngram-lookup-cost.json",
    )


if __name__ == "__main__":
    main()
