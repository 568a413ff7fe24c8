"""W2 (qwen3-0.6b shape, batch 1, greedy) with the decode graphs' own argmax as the step's
tokens against the eager race, alternated in one process (the device machine's speed
drifts between processes): what taking the tokens from the graph costs or saves on the
device when the host is fast enough not to set the pace.

    PYTHONPATH=. python3 benchmarks/sampling_graph_ab.py --commit $(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import engine_workloads
from lanner.runner import sampling_graphs

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    original = sampling_graphs.SamplingGraphs.launch

    def eager_for_plain_greedy(self, logits, rows, wait_for_bitmasks=None):
        if all(r.params.is_greedy and r.token_bitmask is None for r in rows):
            return None  # the eager sampler's race, as before the sampling graphs
        return original(self, logits, rows, wait_for_bitmasks)

    kinds = {"decode_argmax": original, "eager": eager_for_plain_greedy}
    figures: dict[str, list[float]] = {name: [] for name in kinds}
    try:
        for _ in range(args.rounds):
            for name, launch in kinds.items():
                sampling_graphs.SamplingGraphs.launch = launch
                tpot = engine_workloads.single_stream("qwen3-0.6b", False)["tpot_median_ms"]
                figures[name].append(tpot)
                print(f"{name}: {tpot:.4f} ms", flush=True)
    finally:
        sampling_graphs.SamplingGraphs.launch = original
    result = {
        "card": torch.cuda.get_device_name(),
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/sampling_graph_ab.py",
        "tpot_median_ms": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-W2-greedy-ab.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
