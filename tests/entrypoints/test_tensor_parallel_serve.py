"""The embedded demo model with TP=2 from the command line and behind the server (asked
through the openai client): the same greedy text as TP=1; a worker killed under the
server turns /health to 503 and requests fail instead of waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lanner import SamplingParams
from lanner.engine.config import DEFAULT_MODEL_DIR
from lanner.entrypoints.llm import LLM
from tests.entrypoints.server_utils import ServerProcess, running

pytestmark = pytest.mark.slow
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tp1_text() -> str:
    llm = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24)
    [output] = llm.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    llm.engine.core.shutdown()
    return output.outputs[0].text


def test_generate_command_with_two_ranks(tp1_text: str) -> None:
    command = [
        sys.executable, "-m", "lanner.entrypoints.cli", "--log-level", "WARNING", "generate",
        PROMPT, "-tp", "2", "--device", "cpu", "--dtype", "float32",
        "--kv-cache-memory-bytes", str(1 << 24), "--max-tokens", str(MAX_TOKENS),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip("\n") == PROMPT + tp1_text


def worker_pids(core_pid: int) -> list[int]:
    """The tensor-parallel workers: children of the forkserver the core started."""
    workers = []
    for child in Path(f"/proc/{core_pid}/task/{core_pid}/children").read_text().split():
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            workers += Path(f"/proc/{child}/task/{child}/children").read_text().split()
    return [int(pid) for pid in workers]


def test_server_with_two_ranks(tp1_text: str, tmp_path: Path) -> None:
    server = ServerProcess(
        DEFAULT_MODEL_DIR, ["-tp", "2", "--kv-cache-memory-bytes", str(1 << 24)], tmp_path / "log"
    )
    with running({"tp2": server}):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        [model] = [m.id for m in client.models.list().data]
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert reply.choices[0].text == tp1_text
        [worker] = worker_pids(server.core_pid())
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS)
        assert failed.value.status_code >= 500
