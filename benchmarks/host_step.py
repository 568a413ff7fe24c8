"""Host cost of one 256-request decode step, without the model: what the CPU spends per
step scheduling, building the batch and applying results (W3's decode batch size).

Runs anywhere (no GPU needed):
    PYTHONPATH=. python3 benchmarks/host_step.py --commit $(git rev-parse --short HEAD)
Writes one JSON to benchmarks/results/. Two figures:
- the engine core's step with the model replaced by a stub (greedy, so sampling is one
  argmax over a stub's 16 logits): scheduling, chunk building, the eager runner's batch
  building (the GPU's decode graphs stage inputs instead, the second figure), collection
  and stop checks;
- the same with n-gram speculation (k = 4, every draft accepted: 5 tokens a request and
  step) at 256 rows and at one row, beside a plain step at one row;
- staging a decode graph's inputs for 256 rows (``cuda_graphs.stage_inputs``) beside
  building the same tensors with torch.tensor from the lists, the way it was done before.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.request import Request
from lanner.kernels.attention_metadata import shared_prefix_tokens
from lanner.kernels.graph_inputs import GraphInputLayout
from lanner.runner.cuda_graphs import stage_inputs
from lanner.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 256


class ZeroModel(torch.nn.Module):
    """Stands in for the network: zero hidden states, and zero logits over 16 columns so
    the CPU's argmax over them stays negligible (on a GPU it is device work, not host)."""

    def forward(self, input_ids, positions, metadata, kv_caches) -> torch.Tensor:  # noqa: ANN001
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], 16)


def cpu_core(rows: int, model: torch.nn.Module, **options: object) -> EngineCore:
    """An engine core on the CPU for ``rows`` requests at once, ``model`` standing in
    for the demo model's network."""
    core = EngineCore(
        EngineConfig.from_kwargs(
            model=str(DEFAULT_MODEL_DIR),
            dtype="float32",
            device="cpu",
            max_num_seqs=rows,
            max_num_batched_tokens=8192,
            max_model_len=2048,
            **options,
        )
    )
    core.runner.model = model
    return core


def core_step_ms(steps: int, rows: int = ROWS, speculative_config: dict | None = None) -> float:
    """Host time of one engine step (ms). With ``speculative_config`` (n-gram lookup):
    the stub's logits make every request repeat token 0, so lookups always match and
    every draft is accepted: the figure holds the lookup, the draft slots and the
    bookkeeping of k + 1 tokens a request."""
    core = cpu_core(rows, ZeroModel(), speculative_config=speculative_config)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i in range(rows):
        prompt = [rng.randrange(1000) for _ in range(rng.randint(100, 600))]
        core.add_request(Request(f"r{i}", prompt, params))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running) or (
        core.scheduler.waiting
    ):
        core.step()  # prefill chunks, until every request decodes
    for _ in range(3):
        core.step()  # the first lookups match from here
    started = time.perf_counter()
    for _ in range(steps):
        core.step()
    return (time.perf_counter() - started) / steps * 1e3


def spec_step_ms(steps: int) -> dict[str, float]:
    """The host cost speculation adds: steps with n-gram lookup (k = 4, every draft
    accepted) against plain ones, at 256 rows and at one."""
    ngram = {"method": "ngram", "num_speculative_tokens": 4}
    return {
        "spec_ngram_k4_256_rows_step_ms": core_step_ms(steps, ROWS, ngram),
        "plain_1_row_step_ms": core_step_ms(steps, 1),
        "spec_ngram_k4_1_row_step_ms": core_step_ms(steps, 1, ngram),
    }


def staging_ms(repeats: int) -> dict[str, float]:
    rng = random.Random(0)
    tables = [[rng.randrange(30000) for _ in range(rng.randint(10, 70))] for _ in range(ROWS)]
    columns = [[rng.randrange(100000) for _ in range(ROWS)] for _ in range(4)]
    host = torch.zeros((4, ROWS), dtype=torch.long)
    strided = torch.zeros((ROWS, 128), dtype=torch.int32)
    layout = GraphInputLayout(ROWS, 128)
    packed = torch.zeros(layout.size, dtype=torch.long).numpy()  # as DecodeGraphs' host sets

    def from_lists() -> None:  # the torch.tensor-from-lists staging this replaced
        for row, values in enumerate(columns):
            host[row, :ROWS] = torch.tensor(values)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        strided[:ROWS, :width] = torch.tensor(padded, dtype=torch.int32)

    def numpy_views() -> None:  # what DecodeGraphs.stage does (its prefix scan included)
        prefix = shared_prefix_tokens(tables, columns[3], 16)
        stage_inputs(packed, layout, ROWS, *columns, tables, prefix)

    timings = {}
    for name, fn in (("torch_tensor_from_lists_ms", from_lists), ("stage_inputs_ms", numpy_views)):
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        timings[name] = statistics.median(samples)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    result = {
        "workload": "host-step (W3 decode batch of 256, no model)",
        "card": f"CPU only: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/host_step.py",
        "core_step_ms": core_step_ms(args.steps),
        **spec_step_ms(args.steps),
        **staging_ms(200),
    }
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-host-step.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
