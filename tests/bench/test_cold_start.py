"""benchmarks/cold_start.py reads the startup lines lanner serve logs (the engine core's
phases as each ends and its summary, the API server's summary), each phase by name in
seconds, names with commas included; summarizes an engine trial's events (and how it had
its kernels ahead); and makes a kernel manifest stale for --stale-trial."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("cold_start", ROOT / "benchmarks/cold_start.py")
cold_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cold_start)  # type: ignore[union-attr]

LOG = """\
INFO lanner.engine.core: startup phase: load weights 0.41 s
INFO lanner.engine.core: startup phase: profile run, kernel compile and KV cache sizing 3.10 s
INFO lanner.engine.core: startup: process start to engine build (imports) 11.67 s, load weights 0.41 s, profile run, kernel compile and KV cache sizing 3.10 s, engine build 0.45 s
INFO uvicorn: Started server process
INFO lanner.entrypoints.openai.api_server: startup (server): process start to server start (imports) 14.98 s, request workers ready 10.36 s
"""  # noqa: E501


def test_parse_phases_reads_the_engine_core_and_the_server() -> None:
    assert cold_start.parse_phases(LOG) == {
        "summaries": [
            {"who": "engine core", "process start to engine build (imports)": 11.67,
             "load weights": 0.41, "profile run, kernel compile and KV cache sizing": 3.1,
             "engine build": 0.45},
            {"who": "server", "process start to server start (imports)": 14.98,
             "request workers ready": 10.36},
        ],
        "engine_core_phases_reached": {
            "load weights": 0.41, "profile run, kernel compile and KV cache sizing": 3.1
        },
    }  # fmt: skip
    empty = cold_start.parse_phases("no startup lines here\n")
    assert empty == {"summaries": [], "engine_core_phases_reached": {}}


def test_engine_events_summary_counts_compiles_per_kernel_and_step() -> None:
    events = [
        {"event": "mark", "name": "imports", "process_age_s": 5.0},
        {"event": "compile", "kernel": "rms", "seconds": 0.5, "step": "profile run"},
        {"event": "compile", "kernel": "rms", "seconds": 0.25, "step": "graph warm-up batch 8"},
        {"event": "compile", "kernel": "mm", "seconds": 2.0, "step": "profile run"},
        {"event": "step", "name": "profile run", "seconds": 3.0},
    ]  # a trial killed after its profile run: no build or first-token marks
    summary = cold_start.summarize_engine_events(events)
    assert summary["imports_s"] == 5.0
    assert summary["engine_build_s"] is None and summary["first_token_after_imports_s"] is None
    assert summary["num_kernel_compiles_or_loads"] == 3
    assert summary["compiles_per_kernel"] == {
        "mm": {"count": 1, "seconds": 2.0},
        "rms": {"count": 2, "seconds": 0.75},
    }
    assert summary["compiles_per_step"]["profile run"] == {"count": 2, "seconds": 2.5}
    assert summary["reached"] == "step: profile run"


def test_engine_kwargs_reads_serve_flags() -> None:
    flags = ["--load-format", "dummy", "--max-model-len", "8192", "--enforce-eager"]
    assert cold_start.engine_kwargs(flags) == {
        "load_format": "dummy",
        "max_model_len": 8192,
        "enforce_eager": True,
    }


def test_summary_says_how_the_kernels_were_had_ahead() -> None:
    manifest = [
        {"event": "step", "name": "load manifest variants", "seconds": 0.2},
        {"event": "step", "name": "write kernel manifest", "seconds": 0.01},
        {"event": "greedy", "token_ids": [[5, 6]]},
    ]
    summary = cold_start.summarize_engine_events(manifest)
    assert summary["kernels_ahead"] == "kernel manifest"
    assert summary["manifest_written"] and summary["greedy_token_ids"] == [[5, 6]]
    passed = [{"event": "step", "name": "graph compile-only batch 8", "seconds": 0.02}]
    assert cold_start.summarize_engine_events(passed)["kernels_ahead"] == "compile-only pass"
    neither = cold_start.summarize_engine_events([{"event": "mark", "name": "done"}])
    assert neither["kernels_ahead"] is None and not neither["manifest_written"]


def test_stale_manifest_drops_the_named_kernels(tmp_path: Path) -> None:
    variants = [{"qualname": name, "module": "m", "specialization": "{}"} for name in "aab"]
    (tmp_path / "lanner-startup-x.json").write_text(json.dumps({"variants": variants}))
    (tmp_path / "unrelated.json").write_text(json.dumps({"variants": variants}))
    assert cold_start.manifest_variants(tmp_path) == {"lanner-startup-x.json": 3}
    assert cold_start.make_manifests_stale(tmp_path, ("a",)) == 2
    assert cold_start.manifest_variants(tmp_path) == {"lanner-startup-x.json": 1}
    assert len(json.loads((tmp_path / "unrelated.json").read_text())["variants"]) == 3
