"""Where an eager decode step's host time goes: cProfile over 20 eager steps of 16
decoding rows (the graphs set aside), for the demo model and the Llama-3-8B shape (random
weights), on the GPU. Eager steps remain where a step's rows fit no captured graph (and
with ``enforce_eager``); this shows what they cost per Triton launch.

    PYTHONPATH=. python3 benchmarks/eager_step_profile.py > eager-profile.log

Prints, per model, the top functions by own time and by cumulative time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import mixed_step_cost, spec_decode  # noqa: E402

STEPS = 20
ROWS = 16


def profile(model: str) -> None:
    core = mixed_step_cost.make_core(model, ROWS)
    runner = core.runner
    decodes = mixed_step_cost.steps(ROWS, 1, runner.block_size)["decodes"]
    graphs = runner.decode_graphs
    runner.decode_graphs, runner.flatten_row_limit = None, 0
    for _ in range(5):  # warm-up: every kernel variant compiled or loaded
        runner.collect(runner.launch(decodes, None))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(STEPS):
        runner.collect(runner.launch(decodes, None))
    profiler.disable()
    runner.decode_graphs = graphs
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(25)
        print(f"{model}, {STEPS} eager steps of {ROWS} rows, by {order}:\n{text.getvalue()}")
    spec_decode.release(core)


def main() -> None:
    for model in ("demo", "llama3-8b"):
        profile(model)


if __name__ == "__main__":
    main()
