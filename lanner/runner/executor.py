"""Tensor-parallel executors: rank 0's side of the workers (ranks 1..N-1), which run as
child processes (``mp``) or as Ray actors placed by a placement group on an existing Ray
cluster (``ray``).

Rank 0 is the engine core's own ModelRunner: it schedules, sends each step to every worker
as one message over a control connection (a socket per worker), runs the step with them in
lock-step (the model's collectives go over the process group) and samples. A watchdog
thread reads the workers' connections and checks they live; a worker that dies, reports
an error or leaves a step waiting longer than ``distributed_timeout_s`` fails the engine
with an error naming it, and the remaining workers are stopped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

import torch

from lanner.distributed import TensorParallelGroup, TensorParallelShard, host_store
from lanner.runner.model_runner import ModelRunner, StepLayout
from lanner.runner.step_message import decode_command, encode_command, encode_step
from lanner.runner.worker import Rendezvous, WorkerSpec, set_no_delay

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("mp", "ray")
# Start-up (processes starting, weights loading, kernels compiling) is bounded by this.
STARTUP_TIMEOUT_S = 1800.0
# After a collective fails, how long to wait for the watchdog to say which worker went.
_FAILURE_GRACE_S = 2.0
_WATCH_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices, and how its workers are run."""

    tensor_parallel_size: int = 1
    # "mp": one process per GPU on this host; "ray": Ray actors on an existing cluster
    # (None: mp).
    distributed_executor_backend: str | None = None
    # The most a step (or one collective) may wait on a worker before the engine fails.
    distributed_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}"
            )
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}"
            )
        if not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")

    @property
    def backend(self) -> str:
        return self.distributed_executor_backend or "mp"


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died, failed or hung: the engine cannot go on."""


class TensorParallelExecutor:
    """Rank 0's side of the workers: start them, meet them in the process group, drive
    start-up (ready, cache sizing, graph capture), then send steps and watch them."""

    def __init__(self, config: ParallelConfig, spec: WorkerSpec) -> None:
        self.config = config
        self.spec = spec
        self.world_size = config.tensor_parallel_size
        self.shard = TensorParallelShard(0, self.world_size)
        self.failure: str | None = None
        self.connections: dict[int, Connection] = {}
        self.pids: dict[int, int] = {}
        self._replies: dict[int, queue.Queue[tuple[str, tuple[Any, ...]]]] = {
            rank: queue.Queue() for rank in range(1, self.world_size)
        }
        self._busy_since: float | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.group: TensorParallelGroup | None = None
        host = self.host_address()
        self.device = self.rank0_device()
        authkey = secrets.token_bytes(32)
        self._listener = Listener((host, 0), authkey=authkey)
        self._store = host_store(host, self.world_size)
        rendezvous = Rendezvous(self._listener.address, authkey, host, self._store.port)
        try:
            self.start_workers(rendezvous)
            threading.Thread(target=self._accept, name="lanner-tp-accept", daemon=True).start()
            threading.Thread(target=self._watch, name="lanner-tp-watchdog", daemon=True).start()
            self.group = self._wait_for(
                lambda: TensorParallelGroup(
                    self._store, self.shard, self.device, config.distributed_timeout_s, host
                ),
                "the tensor-parallel workers to join the process group",
            )
        except BaseException:
            self.shutdown()
            raise

    # -- what each backend provides ------------------------------------------------------

    def host_address(self) -> str:
        """The address the workers reach rank 0 at."""
        return "127.0.0.1"

    def rank0_device(self) -> torch.device:
        device = self.spec.load_options.get("device")
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def start_workers(self, rendezvous: Rendezvous) -> None:
        raise NotImplementedError

    def dead_workers(self) -> dict[int, str]:
        """rank -> how it ended, for every worker that is no longer running."""
        raise NotImplementedError

    def stop_workers(self) -> None:
        raise NotImplementedError

    # -- start-up ------------------------------------------------------------------------

    def wait_ready(self) -> None:
        """Wait until every worker has loaded its slice of the model."""
        self._gather("ready", STARTUP_TIMEOUT_S)

    def num_blocks(
        self,
        rank0_blocks: Callable[[], int],
        num_tokens: int,
        num_seqs: int,
        max_model_len: int,
        num_speculative_tokens: int,
        useful_blocks: int,
    ) -> int:
        """The KV blocks every rank fits: each profiles its peak memory with the same
        steps (in lock-step) and sizes its cache; the smallest wins."""
        self._broadcast(
            encode_command(
                "profile",
                num_tokens,
                num_seqs,
                max_model_len,
                num_speculative_tokens,
                useful_blocks,
            )
        )
        own = self.guard(rank0_blocks)
        blocks = self._gather("num_blocks", STARTUP_TIMEOUT_S)
        return min([own, *(value for (value,) in blocks)])

    def initialize_cache(self, runner: ModelRunner, *args: Any) -> None:
        """Allocate every rank's KV cache and capture its decode graphs, in lock-step."""
        self._broadcast(encode_command("initialize_cache", *args))
        self.guard(runner.initialize_cache, *args)
        self._gather("cache_ready", STARTUP_TIMEOUT_S)

    def attach(self, runner: ModelRunner) -> None:
        """From now on ``runner`` (rank 0's) sends every step to the workers."""
        runner.followers = self

    # -- steps ---------------------------------------------------------------------------

    def send_step(self, layout: StepLayout) -> None:
        self._broadcast(encode_step(layout))

    def guard(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run ``call(*args)`` on rank 0 while the watchdog times it: a worker failing or
        hanging meanwhile raises WorkerFailedError naming it."""
        self.check()
        self._busy_since = time.monotonic()
        try:
            result = call(*args)
        except WorkerFailedError:
            raise
        except Exception as err:
            # A collective fails when a peer goes: give the watchdog a moment to say which.
            deadline = time.monotonic() + _FAILURE_GRACE_S
            while self.failure is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.failure is None:
                self._fail(f"a tensor-parallel step failed on rank 0: {type(err).__name__}: {err}")
            raise WorkerFailedError(self.failure) from err
        finally:
            self._busy_since = None
        self.check()  # an aborted collective may return without raising
        return result

    def check(self) -> None:
        """Raise WorkerFailedError if a worker has failed."""
        if self.failure is not None:
            raise WorkerFailedError(self.failure)

    def shutdown(self) -> None:
        """Tell the workers to stop, then make sure they have."""
        if self._stopping:
            return
        self._stopping = True
        if self.failure is None:
            with contextlib.suppress(OSError, WorkerFailedError):
                self._broadcast(encode_command("shutdown"))
        self.stop_workers()
        for connection in self.connections.values():
            connection.close()
        self._listener.close()

    # -- internals -----------------------------------------------------------------------

    def _broadcast(self, message: bytes) -> None:
        """One message, written to every worker's connection."""
        self.check()
        if len(self.connections) != self.world_size - 1:
            raise WorkerFailedError("not every tensor-parallel worker has connected")
        try:
            for connection in self.connections.values():
                connection.send_bytes(message)
        except OSError as err:
            self._fail(f"a tensor-parallel worker's connection broke: {err}")
            self.check()

    def _gather(self, name: str, timeout_s: float) -> list[tuple[Any, ...]]:
        """Every worker's reply ``name``, in rank order."""
        deadline = time.monotonic() + timeout_s
        replies = []
        for rank, replies_of_rank in self._replies.items():
            while True:
                self.check()
                try:
                    kind, args = replies_of_rank.get(timeout=_WATCH_INTERVAL_S)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        self._fail(
                            f"tensor-parallel worker {rank} did not answer {name!r} within "
                            f"{timeout_s:.0f}s"
                        )
            if kind != name:
                self._fail(f"tensor-parallel worker {rank} answered {kind!r}, not {name!r}")
                self.check()
            replies.append(args)
        return replies

    def _wait_for(self, make: Callable[[], Any], what: str) -> Any:
        """Run ``make`` in a thread while checking that the workers live: a worker that
        dies first fails here instead of leaving rank 0 waiting on it."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = make()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                result["error"] = err

        thread = threading.Thread(target=run, name="lanner-tp-start", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(_WATCH_INTERVAL_S)
            self.check()
            if time.monotonic() > deadline:
                self._fail(f"timed out after {STARTUP_TIMEOUT_S:.0f}s waiting for {what}")
                self.check()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _accept(self) -> None:
        """Take every worker's connection; its first message says its rank."""
        try:
            while len(self.connections) < self.world_size - 1:
                connection = self._listener.accept()
                set_no_delay(connection)
                name, (rank, pid) = decode_command(connection.recv_bytes())
                if name != "hello" or rank not in self._replies or rank in self.connections:
                    connection.close()
                    continue
                with self._lock:
                    self.pids[rank] = pid
                    self.connections[rank] = connection
        except OSError:
            pass  # the listener was closed: shutting down, or a failure

    def _watch(self) -> None:
        """The watchdog: reads the workers' messages, checks they live and that no step
        waits too long; the first problem fails the engine."""
        timeout = self.config.distributed_timeout_s
        while not self._stopping and self.failure is None:
            with self._lock:
                by_connection = {conn: rank for rank, conn in self.connections.items()}
            ready = wait(list(by_connection), _WATCH_INTERVAL_S) if by_connection else []
            if not by_connection:
                time.sleep(_WATCH_INTERVAL_S)
            for connection in ready:
                rank = by_connection[connection]  # type: ignore[index]
                try:
                    name, args = decode_command(connection.recv_bytes())  # type: ignore[union-attr]
                except (EOFError, OSError):
                    if not self._stopping:
                        self._fail(self._describe_loss(rank, self._how_it_ended(rank)))
                    return
                if name == "failed":
                    self._fail(f"tensor-parallel worker {rank} failed: {args[1]}")
                    return
                self._replies[rank].put((name, args))
            if self._stopping:
                return
            dead = self.dead_workers()
            if dead:
                rank, how = next(iter(dead.items()))
                self._fail(self._describe_loss(rank, how))
                return
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > timeout:
                self._fail(
                    f"a step waited more than distributed_timeout_s={timeout:.0f}s on the "
                    f"tensor-parallel workers (pids {sorted(self.pids.values())}): one of "
                    f"them hangs; they were stopped"
                )
                return

    def _how_it_ended(self, rank: int) -> str:
        """How a worker whose connection closed ended, once its exit is known (its
        connection closes a moment before the exit is reported)."""
        deadline = time.monotonic() + _FAILURE_GRACE_S
        while time.monotonic() < deadline:
            how = self.dead_workers().get(rank)
            if how is not None:
                return how
            time.sleep(0.02)
        return "closed its connection"

    def _describe_loss(self, rank: int, how: str) -> str:
        pid = self.pids.get(rank)
        where = f" (pid {pid})" if pid is not None else ""
        return f"tensor-parallel worker {rank}{where} {how}"

    def _fail(self, reason: str) -> None:
        """Record the first failure, stop every worker, and abort the group so that no
        collective of rank 0 keeps waiting."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = f"{reason}; the engine cannot continue (restart it)"
        logger.error("%s", self.failure)
        self.stop_workers()
        if self.group is not None:
            self.group.abort()
        self._listener.close()


class MultiprocExecutor(TensorParallelExecutor):
    """Workers as child processes of this one, on this host: rank r on GPU r (or on the
    CPU). They are forked from a server process that has imported the worker module once
    (multiprocessing's forkserver), so each starts in a fraction of a second; none has
    touched CUDA before its own start."""

    def start_workers(self, rendezvous: Rendezvous) -> None:
        import multiprocessing

        from lanner.runner.worker import run_worker

        if self.device.type == "cuda" and torch.cuda.device_count() < self.world_size:
            raise ValueError(
                f"tensor_parallel_size={self.world_size} needs {self.world_size} GPUs, but "
                f"{torch.cuda.device_count()} are visible; lower tensor_parallel_size, set "
                f"CUDA_VISIBLE_DEVICES, or use distributed_executor_backend='ray' across hosts"
            )
        # A daemonic process (the server's engine core) may not start children, lest
        # they outlive it; these workers do not: each exits when its connection to rank
        # 0 closes, and the forkserver when its parent goes. So let this one start them.
        multiprocessing.current_process().daemon = False
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["lanner.runner.worker"])
        self.processes = {}
        for rank in range(1, self.world_size):
            process = context.Process(
                target=run_worker,
                args=(self.spec, rank, rendezvous),
                name=f"lanner-tp-worker-{rank}",
                daemon=True,
            )
            process.start()
            self.processes[rank] = process

    def dead_workers(self) -> dict[int, str]:
        return {
            rank: describe_exit(process.exitcode)
            for rank, process in self.processes.items()
            if process.exitcode is not None
        }

    def stop_workers(self) -> None:
        processes = getattr(self, "processes", {})
        for process in processes.values():
            process.join(0 if self.failure else 5.0)
            if process.is_alive():
                process.kill()
        for process in processes.values():
            process.join(5.0)


def describe_exit(exitcode: int) -> str:
    """A child process's end, as multiprocessing reports it (-N: killed by signal N)."""
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name} (exit code {exitcode})"
    return f"exited (exit code {exitcode})"


def start_executor(config: ParallelConfig, spec: WorkerSpec) -> TensorParallelExecutor:
    """The executor of ``config``'s backend, its workers started and in the group."""
    if config.backend == "ray":
        from lanner.runner.ray_executor import RayExecutor

        return RayExecutor(config, spec)
    return MultiprocExecutor(config, spec)
