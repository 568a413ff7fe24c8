"""An engine startup compiles few Triton kernel variants, and more decode-graph batch sizes
add none: each variant is one compile on an empty Triton cache (0.2-1.8 s each for sm_90
on the CPU machine), so a constexpr or specialization that follows the batch size would
multiply a cold start. Counted by benchmarks/startup_kernels.py (the startup's launches on
the meta device, recorded as the sm_90 variants they would compile) for the llama3-8b
shape cut to two layers (the variants do not depend on the depth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
# Variants of the 8B startup at this test's writing (profile run, 35 graph sizes, sampler).
MAX_VARIANTS = 19

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
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed: no sm_90 variants to count")
    config = json.loads((ROOT / "benchmarks/shapes/llama3-8b/config.json").read_text())
    config["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    # Outside the interpreter: @triton.jit must give real JITFunctions to record.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", COUNT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    at_256, at_512 = counts["256"], counts["512"]
    assert at_256["num_variants"] <= MAX_VARIANTS, at_256
    # 512 rows capture 8 more sizes (288..512): none may compile anything new.
    assert at_512["num_variants"] == at_256["num_variants"], (at_256, at_512)
    assert at_512["per_kernel"] == at_256["per_kernel"]
