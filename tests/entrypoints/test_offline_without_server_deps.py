"""The offline engine and the CLI import without the server's packages (the GPU machine
lacks them); only `lanner serve` needs them, and says how to get them."""

from __future__ import annotations

import subprocess
import sys

SERVER_PACKAGES = ["fastapi", "uvicorn", "pydantic", "zmq", "msgspec", "prometheus_client"]

_SCRIPT = f"""
import sys
for name in {SERVER_PACKAGES!r}:
    sys.modules[name] = None  # any import of it now raises ImportError
import lanner.engine.llm_engine, lanner.engine.output_processor
from lanner import LLM, SamplingParams
from lanner.entrypoints import cli
cli.build_parser().parse_args(["serve", "--port", "1"])
assert cli.main(["serve", "--port", "1"]) == 2
"""


def test_offline_engine_imports_without_server_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'lanner[serve]'" in result.stderr
