"""Host cost of structured outputs per engine step, without the model: the CPU time the
engine loop spends per step with N requests under W10's JSON schema against N free ones
(xgrammar over a synthetic 151,643-token vocabulary, as benchmarks/engine_workloads.py
W10 uses), on the CPU.

Runs anywhere (no GPU needed), e.g. from the repository root:
    PYTHONPATH=. python3 benchmarks/structured_host_step.py --rows 1,64,256 \
        --commit $(git rev-parse --short HEAD)
Prints one JSON object and writes it to benchmarks/results/ (and $OUT when set). With
``--fill-scaling ROWS``: xgrammar's fill alone at W10's states (fill_scaling). Per row
count:
- ``step_ms``: the engine core's step (overlapped scheduling, as on a GPU), wall time;
- ``device_ms``: the part of it spent in what a GPU would run (the stub model's logits,
  the bitmask's application, the argmax), timed and taken out;
- ``host_ms``: the difference, the engine loop's time per step (waiting for the fill
  included);
- ``loop_cpu_ms``: the loop thread's own CPU time per step less the stand-ins' (the
  fill counts where it runs on that thread): robust against the machine's other load;
- ``fill_ms``: xgrammar's fill per step (the batch call's, or each matcher's own for
  a few rows), on whichever thread runs it;
- ``phases``: benchmarks/step_phases.py's mean ms per step of each call the loop makes
  (the stand-ins for the device included where they run inside one);
- for the constrained run, ``host_ms_over_free`` and ``loop_cpu_ms_over_free``.
All medians over the timed steps (fill_ms a mean).
The stub model gives random logits over the first 4,096 tokens only (the masked argmax
picks from them), so the CPU's stand-in for the device stays small; the grammar's
bitmasks still cover the whole vocabulary. Finished requests are replaced, so each
step runs N rows. With a 2-core machine, xgrammar's fill gets one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import xgrammar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_workloads import W10_SCHEMA, synthetic_vocabulary  # noqa: E402
from host_step import cpu_core  # noqa: E402
from step_phases import StepPhases  # noqa: E402

import lanner.kernels.ops as ops  # noqa: E402
import lanner.runner.sampler as sampler  # noqa: E402
from lanner.bench.report import save_copies  # noqa: E402
from lanner.engine.request import Request  # noqa: E402
from lanner.engine.structured_output import StructuredOutputManager  # noqa: E402
from lanner.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 151936  # Qwen3's rows: the first 151,643 are tokens
LOGIT_COLUMNS = 4096
STOP_TOKEN = 1000  # within the stub's columns, so a finished grammar can stop


class DeviceTime:
    """Seconds (wall, and the calling thread's CPU) spent in the calls wrapped by
    ``timed``: what a GPU would run, or xgrammar's fill."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def timed(self, fn):  # noqa: ANN001, ANN201
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.cpu_seconds += time.thread_time() - cpu_started

        return wrapper


class RandomLogitsModel(torch.nn.Module):
    """Stands in for the network: zero hidden states and, each step, other random logits
    (a view of a pool: no generation cost)."""

    def __init__(self, rows: int, device_time: DeviceTime) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.pool = torch.randn(rows + 97, LOGIT_COLUMNS, generator=generator)
        self.offset = 0
        self.compute_logits = device_time.timed(self._logits)

    def forward(self, input_ids, positions, metadata, kv_caches) -> torch.Tensor:  # noqa: ANN001
        return torch.zeros(input_ids.shape[0], 1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.offset = (self.offset + 7) % 97
        return self.pool[self.offset : self.offset + hidden.shape[0]]


def measure(rows: int, constrained: bool, steps: int) -> dict[str, float]:
    device_time, fill_time = DeviceTime(), DeviceTime()
    # The device's work on the CPU, timed (the sampler looks both up at call time); and
    # xgrammar's batch fill (on whichever thread runs it).
    patched = [
        (ops, "apply_token_bitmask", device_time),
        (sampler, "greedy_tokens", device_time),
        (xgrammar.BatchGrammarMatcher, "batch_fill_next_token_bitmask", fill_time),
        (xgrammar.GrammarMatcher, "fill_next_token_bitmask", fill_time),  # a few rows'
    ]
    originals = [getattr(owner, name) for owner, name, _ in patched]
    for owner, name, timer in patched:
        setattr(owner, name, timer.timed(getattr(owner, name)))
    try:
        figures = _measure(rows, constrained, steps, device_time, fill_time)
    finally:
        for (owner, name, _), original in zip(patched, originals, strict=True):
            setattr(owner, name, original)
    return figures


def _measure(
    rows: int, constrained: bool, steps: int, device_time: DeviceTime, fill_time: DeviceTime
) -> dict[str, float]:
    # Overlapped scheduling, as on a GPU: constrained steps sample deferred.
    core = cpu_core(rows, RandomLogitsModel(rows, device_time), async_scheduling=True)
    core.structured_outputs = StructuredOutputManager("", VOCAB, (STOP_TOKEN,))
    core.structured_outputs.use_vocabulary(synthetic_vocabulary(151643))
    constraint = StructuredOutputsParams(json=W10_SCHEMA) if constrained else None
    params = SamplingParams(
        temperature=0.0, max_tokens=1000, ignore_eos=True, structured_outputs=constraint
    )
    rng = random.Random(0)
    added = 0

    def add(count: int) -> None:
        nonlocal added
        for _ in range(count):
            prompt = [rng.randrange(LOGIT_COLUMNS) for _ in range(32)]
            core.add_request(Request(f"r{added}", prompt, params))
            added += 1

    add(rows)
    while core.scheduler.waiting or core._compiling or len(core.scheduler.running) < rows:
        core.step()
    for _ in range(3):
        core.step()
    fill_time.seconds = fill_time.cpu_seconds = 0.0  # the timed steps' only
    phases = StepPhases(core)
    wall, device, loop_cpu = [], [], []
    running = finished = 0
    for _ in range(steps):
        running += len(core.scheduler.running)
        device_before, device_cpu_before = device_time.seconds, device_time.cpu_seconds
        started, cpu_started = time.perf_counter(), time.thread_time()
        phases.begin_step()
        outputs = core.step()
        phases.end_step()
        wall.append(time.perf_counter() - started)
        device.append(device_time.seconds - device_before)
        device_cpu = device_time.cpu_seconds - device_cpu_before
        loop_cpu.append(time.thread_time() - cpu_started - device_cpu)
        done = sum(1 for out in outputs if out.finished)
        finished += done
        add(done)  # keep N rows running
    phases.close()
    core.shutdown()

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 3)

    return {
        "step_ms": ms(wall),
        "device_ms": ms(device),
        "host_ms": ms([w - d for w, d in zip(wall, device, strict=True)]),
        "loop_cpu_ms": ms(loop_cpu),
        "fill_ms": round(fill_time.seconds / steps * 1e3, 3),
        "mean_running": round(running / steps, 1),
        "finished_per_step": round(finished / steps, 2),
        "phases": phases.summary(),
    }


def fill_scaling(walkers: int, seed: int = 0) -> dict:
    """xgrammar's own fill cost at W10's states: ``walkers`` matchers of its schema, each
    walked 1-40 tokens (each a random token its mask allows), then each row's fill alone
    (µs, the distribution), and the batch fill of all of them with 1, 2, 4, ... threads up
    to the engine's (structured_output.fill_threads()): how the fill parallelizes here."""
    from lanner.engine.structured_output import fill_threads

    manager = StructuredOutputManager("", VOCAB, (STOP_TOKEN,))
    manager.use_vocabulary(synthetic_vocabulary(151643))
    compiled = manager._compile(StructuredOutputsParams(json=W10_SCHEMA))
    words = xgrammar.allocate_token_bitmask(walkers, VOCAB)
    bits = torch.arange(32, dtype=torch.int32)
    rng = random.Random(seed)
    matchers = []
    for _ in range(walkers):
        matcher = xgrammar.GrammarMatcher(compiled)
        for _ in range(rng.randint(1, 40)):
            matcher.fill_next_token_bitmask(words, 0)
            allowed = ((words[0].unsqueeze(1) >> bits) & 1).flatten()[:151643].nonzero()
            token = int(allowed[rng.randrange(allowed.shape[0])])
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
        matchers.append(matcher)
    alone = []
    for index, matcher in enumerate(matchers):
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(words, index)
        alone.append((time.perf_counter() - started) * 1e6)
    alone.sort()
    result: dict = {
        "rows": walkers,
        "row_fill_us": {
            "median": round(statistics.median(alone), 1),
            "p10": round(alone[len(alone) // 10], 1),
            "p90": round(alone[len(alone) * 9 // 10], 1),
            "max": round(alone[-1], 1),
            "sum_ms": round(sum(alone) / 1e3, 3),
        },
        "engine_fill_threads": fill_threads(),
        "batch_fill_ms_by_threads": {},
    }
    threads = 1
    while True:
        batch = xgrammar.BatchGrammarMatcher(threads)
        batch.batch_fill_next_token_bitmask(matchers, words)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            batch.batch_fill_next_token_bitmask(matchers, words)
            times.append(time.perf_counter() - started)
        result["batch_fill_ms_by_threads"][str(threads)] = round(min(times) * 1e3, 3)
        if threads >= fill_threads():
            break
        threads = min(threads * 2, fill_threads())
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,64,256", help="comma-separated row counts")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--label", default="", help="a name for this run in the file name")
    parser.add_argument(
        "--fill-scaling",
        type=int,
        default=0,
        metavar="ROWS",
        help="also time xgrammar's fill alone for ROWS matchers at W10's states, per row "
        "and batched over 1, 2, 4, ... threads",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict = {
        "workload": "structured-host-step (W10's schema, no model)",
        "card": f"CPU only: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, 1 torch thread",
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/structured_host_step.py --rows "
        + args.rows
        + (f" --fill-scaling {args.fill_scaling}" if args.fill_scaling else ""),
    }
    if args.fill_scaling:
        result["fill_scaling"] = fill_scaling(args.fill_scaling)
        print(json.dumps(result["fill_scaling"]), flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        for name, constrained in (("free", False), ("json_schema", True)):
            result[f"{rows}_rows_{name}"] = measure(rows, constrained, args.steps)
        free, schema = result[f"{rows}_rows_free"], result[f"{rows}_rows_json_schema"]
        for figure in ("host_ms", "loop_cpu_ms"):
            schema[f"{figure}_over_free"] = round(schema[figure] - free[figure], 3)
    label = f"-{args.label}" if args.label else ""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-structured-host-step{label}.json"
    save_copies(result, RESULTS, name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
