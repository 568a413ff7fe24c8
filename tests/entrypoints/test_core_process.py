"""The engine core process on its own: it serves a client over ZMQ, and exits by itself
when the process that started it dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_CLIENT = """
import asyncio, sys
from lanner.engine.config import EngineConfig
from lanner.engine.core_client import AsyncCoreClient
from lanner.engine.request import Request
from lanner.sampling_params import SamplingParams
from lanner.engine.core_messages import CoreOutputs

async def main():
    config = EngineConfig.from_kwargs(model=sys.argv[1], dtype="float32", device="cpu",
        block_size=4, num_gpu_blocks_override=64, max_model_len=64)
    client = AsyncCoreClient(config)
    ready = await client.start()
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
    client.add_requests([Request("r#0", [1, 2, 3], params)])
    tokens = []
    while len(tokens) < 5:
        message = await client.receive()
        if isinstance(message, CoreOutputs):
            for out in message.outputs:
                tokens += out.new_token_ids
    print(client.process.pid, ready.max_model_len, len(tokens), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


def test_core_process_serves_then_exits_with_its_parent(
    tiny_model_dirs: dict[str, Path],
) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(tiny_model_dirs["llama"])],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        assert line, "the client script failed"
        core_pid, max_model_len, num_tokens = map(int, line.split())
        assert (max_model_len, num_tokens) == (64, 5)
        assert not exited(core_pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not exited(core_pid):
            if time.monotonic() > deadline:
                pytest.fail("the orphaned engine core did not exit")
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
