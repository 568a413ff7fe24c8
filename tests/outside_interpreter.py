"""Runs Python code in a subprocess outside Triton's CPU interpreter (where @triton.jit
gives real JITFunctions, to record or compile for sm_90), and returns the JSON its last
line of output prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]


def run_outside_interpreter(code: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """``python -c code args`` from the repository root without TRITON_INTERPRET (skips
    the test where Triton has no NVIDIA backend); its last stdout line, as JSON."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed: no sm_90 variants here")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(PYTHONPATH=str(ROOT), **(env or {}))
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
