"""Processes for the routing benchmarks (route_w9.py, route_overhead.py): `lanner serve`
replicas and `lanner router` as subprocesses on free loopback ports, their /metrics
scraped, and all of them stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

CLI = [sys.executable, "-m", "lanner.entrypoints.cli", "--log-level", "WARNING"]


def result_header(
    workload: str, commit: str, started: float, card: str = "cpu", **fields: Any
) -> dict[str, Any]:
    """What every routing benchmark's JSON holds besides its figures."""
    return {
        "workload": workload,
        "card": card,
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        **fields,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(
    url: str, process: subprocess.Popen, timeout_s: float, log: Path | None = None
) -> None:
    """Until `url`/health answers 200; fails early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise RuntimeError(f"{url} exited:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in {timeout_s}s")


class Process:
    """One server subprocess in its own session (so its engine core goes with it)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*CLI, *args, "--port", str(self.port), "--uvicorn-log-level", "warning"]
        self.log = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        wait_healthy(self.url, self.process, timeout_s, self.log)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


def start_replicas(count: int, serve_args: list[str], logs: Path) -> list[Process]:
    """`count` replicas at once, each on one thread: replicas that outnumber the cores
    and spin OpenMP threads at each other turn 0.15 s requests into seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    replicas = [
        Process(["serve", *serve_args], logs / f"replica{i}.log", {"OMP_NUM_THREADS": "1"})
        for i in range(count)
    ]
    for replica in replicas:
        replica.wait_ready()
    return replicas


def start_router(worker_urls: list[str], router_args: list[str], log: Path) -> Process:
    router = Process(["router", "--worker-urls", *worker_urls, *router_args], log)
    router.wait_ready()
    deadline = time.monotonic() + 60
    while httpx.get(f"{router.url}/health").json()["workers_up"] < len(worker_urls):
        if time.monotonic() > deadline:
            raise TimeoutError("the router did not see every worker up")
        time.sleep(0.2)
    return router
