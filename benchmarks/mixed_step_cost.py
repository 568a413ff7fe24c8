"""What a step with a prefill in it costs against a decode step, for the demo model on the
GPU: the cost that speculation's staggered refills (and any server's arrivals) pay, and
what CUDA graphs around everything but attention could win back.

For D decoding rows (each its own sequence at position ~300) and one prefill chunk of P
tokens, one engine core's runner times, as separate launches each followed by a sync:
- ``graph_decode``: the D rows alone, replayed by a decode CUDA graph;
- ``eager_decode``: the same rows with the graphs set aside (the eager path);
- ``eager_prefill``: the chunk alone;
- ``mixed``: the D rows and the chunk in one step as the engine runs it: where the rows
  fit a decode graph, the chunk as one-token rows of it (ModelRunner._flattens_prefills);
- ``mixed_eager``: the same step run eagerly (as before flattening);
- ``split``: the D rows by the graph, then the chunk eagerly, read back together (two
  forwards instead of one).
Each is the median of --repeats, host (until the launches return) and wall (until their
samples are read back), in ms. ``mixed`` and ``mixed_eager`` must sample the same greedy
tokens (checked; the figures say so). ``--model llama3-8b`` times the 8B shape with
random weights.

    PYTHONPATH=. python3 benchmarks/mixed_step_cost.py --commit $(git rev-parse --short HEAD)

Writes <stamp>-mixed-step-cost.json (benchmarks/results/ and $OUT).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import spec_decode  # noqa: E402
from lanner.bench.report import card_name, new_result, save_copies  # noqa: E402
from lanner.runner.model_runner import SequenceChunk  # noqa: E402
from lanner.runner.sampler import SamplingRow  # noqa: E402
from lanner.sampling_params import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POSITION = 300  # each decoding row's context


def steps(decode_rows: int, prefill_tokens: int, block_size: int) -> dict[str, list]:
    """The chunks of each case: D decode rows on their own blocks, one prefill chunk."""
    greedy = SamplingRow(SamplingParams(temperature=0.0), [0], [], ())
    per_seq = -(-(POSITION + 1) // block_size)
    decodes = [
        SequenceChunk(f"d{i}", [7], POSITION, list(range(i * per_seq, (i + 1) * per_seq)), greedy)
        for i in range(decode_rows)
    ]
    first = decode_rows * per_seq
    table = list(range(first, first + -(-prefill_tokens // block_size)))
    prefill = [SequenceChunk("p", [7] * prefill_tokens, 0, table, greedy)]
    return {"decodes": decodes, "prefill": prefill}


def timed(runner, launches, repeats: int) -> dict[str, float]:  # noqa: ANN001
    """Median host (until ``launches()`` returns its launched steps) and wall (until
    they are read back) ms."""
    host, wall = [], []
    for i in range(repeats + 3):
        spec_decode._sync()
        started = time.perf_counter()
        pending = launches()
        launched = time.perf_counter()
        for step in pending:
            runner.collect(step)
        spec_decode._sync()
        done = time.perf_counter()
        if i >= 3:  # the first ones warm up
            host.append((launched - started) * 1e3)
            wall.append((done - started) * 1e3)
    return {"host_ms": statistics.median(host), "wall_ms": statistics.median(wall)}


def make_core(model: str, decode_rows: int):  # noqa: ANN201
    batch = max(decode_rows, 16)
    if model == "demo":
        return spec_decode.make_core(str(spec_decode.DEFAULT_MODEL_DIR), batch, None)
    return spec_decode.make_core(str(spec_decode.SHAPES / model), batch, None, load_format="dummy")


def measure(model: str, decode_rows: int, prefill_tokens: int, repeats: int) -> dict[str, dict]:
    core = make_core(model, decode_rows)
    runner = core.runner
    chunks = steps(decode_rows, prefill_tokens, runner.block_size)
    graphs, limit = runner.decode_graphs, runner.flatten_row_limit

    def eager(parts: list[SequenceChunk]):  # noqa: ANN202
        runner.decode_graphs, runner.flatten_row_limit = None, 0
        try:
            return [runner.launch(parts, None)]
        finally:
            runner.decode_graphs, runner.flatten_row_limit = graphs, limit

    decodes, prefill = chunks["decodes"], chunks["prefill"]
    mixed = decodes + prefill
    cases = {
        "graph_decode": lambda: [runner.launch(decodes, None)],
        "eager_decode": lambda: eager(decodes),
        "eager_prefill": lambda: [runner.launch(prefill, None)],
        "mixed": lambda: [runner.launch(mixed, None)],
        "mixed_eager": lambda: eager(mixed),
        "split": lambda: [runner.launch(decodes, None), runner.launch(prefill, None)],
    }
    figures = {name: timed(runner, fn, repeats) for name, fn in cases.items()}
    replayed = runner.prepare(mixed).layout.replay
    tokens = runner.collect(runner.launch(mixed, None)).sampled_token_ids
    same = tokens == runner.collect(eager(mixed)[0]).sampled_token_ids
    figures["check"] = {"mixed_replays_a_graph": replayed, "same_greedy_tokens": same}
    spec_decode.release(core)
    print(f"  D={decode_rows:3d} P={prefill_tokens:4d}  {figures['check']}", flush=True)
    for name, value in figures.items():
        if name == "check":
            continue
        print(
            f"  D={decode_rows:3d} P={prefill_tokens:4d}  {name:14s} host {value['host_ms']:6.3f} "
            f"ms  wall {value['wall_ms']:6.3f} ms",
            flush=True,
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-rows", default="16,64")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", default="demo", help="demo, or a shape: llama3-8b")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script")
    spec_decode.add_pin_argument(parser)
    args = parser.parse_args()
    spec_decode.pin_to_core(args.pin_core)
    spec_decode.DEVICE = args.device
    figures = {
        f"decode{rows}_prefill{args.prefill_tokens}": measure(
            args.model, rows, args.prefill_tokens, args.repeats
        )
        for rows in (int(r) for r in args.decode_rows.split(","))
    }
    result = new_result("mixed-step-cost", "demo-model" if args.model == "demo" else args.model)
    result.update(
        card=card_name(),
        commit=args.commit,
        command="PYTHONPATH=. python3 benchmarks/mixed_step_cost.py " + " ".join(sys.argv[1:]),
        host_probe_ms=spec_decode.host_probe_ms(),
        figures=figures,
    )
    suffix = "" if args.model == "demo" else f"-{args.model}"
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-mixed-step-cost{suffix}.json")


if __name__ == "__main__":
    main()
