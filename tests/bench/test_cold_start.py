"""benchmarks/cold_start.py reads both startup lines lanner serve logs: the engine core's
and the API server's phases, each by name, in seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("cold_start", ROOT / "benchmarks/cold_start.py")
cold_start = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cold_start)  # type: ignore[union-attr]

LOG = """\
INFO lanner.engine.core: startup: process start to engine build (imports) 11.67 s, load weights 0.41 s, engine build 0.45 s
INFO uvicorn: Started server process
INFO lanner.entrypoints.openai.api_server: startup (server): process start to server start (imports) 14.98 s, request workers ready 10.36 s
"""  # noqa: E501


def test_parse_phases_reads_the_engine_core_and_the_server() -> None:
    assert cold_start.parse_phases(LOG) == [
        {"who": "engine core", "process start to engine build (imports)": 11.67,
         "load weights": 0.41, "engine build": 0.45},
        {"who": "server", "process start to server start (imports)": 14.98,
         "request workers ready": 10.36},
    ]  # fmt: skip
    assert cold_start.parse_phases("no startup lines here\n") == []
