"""The front end's side of an engine core process: start it, send it messages, read its
outputs, and notice when it dies.

Only the server imports this module (the offline engine runs without pyzmq/msgspec).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from lanner.engine.config import EngineConfig
from lanner.engine.core_messages import (
    AbortRequests,
    AddRequests,
    ClientMessage,
    CoreFailed,
    CoreMessage,
    CoreReady,
    Shutdown,
)
from lanner.engine.core_process import run_engine_core
from lanner.engine.request import Request

logger = logging.getLogger(__name__)

# How often a waiting reader checks that the core process is still alive.
LIVENESS_CHECK_S = 0.1


class EngineDeadError(RuntimeError):
    """The engine core process failed or exited; no request can finish."""


def request_to_dict(request: Request) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "prompt_token_ids": request.prompt_token_ids,
        "sampling_params": request.sampling_params.to_dict(),
        "eos_token_ids": list(request.eos_token_ids),
        "priority": request.priority,
        "arrival_time": request.arrival_time,
        "prefix_source_id": request.prefix_source_id,
    }


@contextlib.contextmanager
def _environment(changes: dict[str, str]) -> Iterator[None]:
    """os.environ with `changes` while the block runs: a spawned child copies the
    environment when it starts, and nothing awaits in between."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class AsyncCoreClient:
    """Drives one engine core process over two ZMQ pipes (PUSH in, PULL out)."""

    def __init__(self, config: EngineConfig, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self._dir = tempfile.mkdtemp(prefix="lanner-core-")
        self._context = zmq.asyncio.Context()
        # Sends are plain (not asyncio) calls, so any thread may send, e.g. the shutdown.
        self._sync_context = zmq.Context()
        input_address = f"ipc://{self._dir}/input"
        output_address = f"ipc://{self._dir}/output"
        # Sends never wait: the core drains its input every step.
        self._input = self._sync_context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_engine_core,
            args=(config, input_address, output_address, os.getpid()),
            name="lanner-engine-core",
            daemon=True,
        )
        self.closed = False

    def launch(self) -> None:
        """Start the core process, which imports and loads the model meanwhile: `lanner
        serve` launches it before importing the server, so the two overlap."""
        if self.process.pid is None:
            with _environment(self.env):
                self.process.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def start(self, timeout_s: float = 1800.0) -> CoreReady:
        """Start the core process (unless launched) and wait until its model is loaded."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = await self.receive()
            if isinstance(message, CoreReady):
                return message
            if isinstance(message, CoreFailed):
                raise EngineDeadError(f"the engine core failed to start: {message.message}")
        raise EngineDeadError(f"the engine core did not start within {timeout_s:.0f}s")

    def send(self, message: ClientMessage) -> None:
        """Queue a message for the core (never blocks: no high-water mark)."""
        if self.closed:
            raise EngineDeadError("the engine core client is shut down")
        self._input.send(self._encoder.encode(message), flags=zmq.NOBLOCK)

    def add_requests(self, requests: list[Request]) -> None:
        self.send(AddRequests([request_to_dict(r) for r in requests]))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and not self.closed:
            self.send(AbortRequests(request_ids))

    async def receive(self) -> CoreMessage:
        """The core's next message; EngineDeadError once it has exited."""
        while True:
            if await self._output.poll(int(LIVENESS_CHECK_S * 1000)):
                return self._decoder.decode(await self._output.recv())
            if not self.process.is_alive():
                # It may have sent a last message just before exiting.
                if await self._output.poll(0):
                    return self._decoder.decode(await self._output.recv())
                raise EngineDeadError(
                    f"the engine core process exited (exit code {self.process.exitcode})"
                )

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Ask the core to stop, then make sure it has; close the pipes."""
        if self.closed:
            return
        if self.process.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            self.process.join(timeout_s)
            if self.process.is_alive():
                logger.warning("engine core did not stop in %.0fs; terminating it", timeout_s)
                self.process.terminate()
                self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.closed = True
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        self._sync_context.term()
        shutil.rmtree(self._dir, ignore_errors=True)
