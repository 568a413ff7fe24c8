"""Start `lanner serve` as a real subprocess on a free loopback port, and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# Small and CPU-friendly: float32 so greedy outputs match the offline LLM exactly.
TINY_SERVER_ARGS = ["--dtype", "float32", "--device", "cpu", "--block-size", "4"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        model_dir: Path,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "lanner.entrypoints.cli", "--log-level", "WARNING",
            "serve", str(model_dir), *TINY_SERVER_ARGS, *args,
            "--host", "127.0.0.1", "--port", str(self.port), "--uvicorn-log-level", "warning",
        ]  # fmt: skip
        self._log = log_path.open("wb")
        # Its own session, so teardown can end the server and its engine core together.
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # One intra-op thread: the server's processes share the test machine's 2 cores.
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def core_pid(self) -> int:
        """The engine core: the server's spawned child that is not multiprocessing's
        resource tracker."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return int(child)
        raise RuntimeError(f"no engine core among the server's children {children}")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        else:
            # The server is gone; make sure nothing of its session lingers either.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def running(servers: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """Servers already started (they load together) once each is ready; all stopped at
    the end, whatever happens."""
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()
