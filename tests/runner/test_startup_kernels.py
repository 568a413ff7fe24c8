"""An engine startup compiles few Triton kernel variants, and more decode-graph batch sizes
add none: each variant is one compile on an empty Triton cache (0.2-1.8 s each for sm_90
on the CPU machine), so a constexpr or specialization that follows the batch size would
multiply a cold start. Counted by benchmarks/startup_kernels.py (the startup's launches on
the meta device, recorded as the sm_90 variants they would compile) for the llama3-8b
shape cut to two layers (the variants do not depend on the depth)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.outside_interpreter import ROOT, run_outside_interpreter

# Variants of the 8B startup (profile run, 35 graph sizes, sampler): 19, and since the
# graphs unpack their inputs (kernels/graph_inputs.py) one more, and since the sampling
# graphs read grammar bitmasks in the race (runner/sampling_graphs.py) one more.
MAX_VARIANTS = 21

COUNT = """
import json, sys
from benchmarks.startup_kernels import record_startup_variants, summarize
counts = {}
for seqs in (256, 512):
    recorder = record_startup_variants(sys.argv[1], max_num_seqs=seqs)
    counts[seqs] = summarize(list(recorder.variants.values()))
print(json.dumps(counts))
"""


def test_startup_variants_are_few_and_do_not_grow_with_graph_sizes(tmp_path: Path) -> None:
    config = json.loads((ROOT / "benchmarks/shapes/llama3-8b/config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    counts = run_outside_interpreter(COUNT, str(tmp_path))
    at_256, at_512 = counts["256"], counts["512"]
    assert at_256["num_variants"] <= MAX_VARIANTS, at_256
    # 512 rows capture 8 more sizes (288..512): none may compile anything new.
    assert at_512["num_variants"] == at_256["num_variants"], (at_256, at_512)
    assert at_512["per_kernel"] == at_256["per_kernel"]
