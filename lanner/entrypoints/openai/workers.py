"""Worker processes that prepare requests (prepare.py) off the event loop, each request
under a time budget: a worker that runs past it is killed and replaced.

Parsing a large body, rendering a chat template and tokenizing are all CPU work on input
the client chooses. In the server's own process they would hold the event loop (and the
GIL) for as long as the client likes; in a worker, the loop only waits on a pipe, and a
runaway template (a nested loop, ``'ab' * 10**9``) costs one killed process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import multiprocessing
import os
import resource
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from lanner.entrypoints.http_guards import OpenAIError, bad_request
from lanner.entrypoints.openai.prepare import PrepareContext, PreparedRequest, prepare
from lanner.model.tokenizer import load_tokenizer, tokenizer_modules
from lanner.model.tokenizer_cache import transformers_tokenizer

logger = logging.getLogger(__name__)

# Address space a worker may grow by past what it maps once started: a template that
# builds a huge string then fails with MemoryError instead of swapping the machine.
WORKER_MEMORY_HEADROOM = 2 << 30
WORKER_START_TIMEOUT_S = 300.0
WORKER_NICENESS = 10


def _forkserver_context(tokenizer_source: str) -> Any:
    # Workers fork from a server process that has imported this module and the tokenizer's
    # (transformers) once, so starting one, or replacing a killed one, takes a fraction of
    # a second.
    context = multiprocessing.get_context("forkserver")
    # xgrammar too when installed: checking a request's schema or grammar needs it, and
    # importing it on a request would take that request's time budget.
    grammar = ["xgrammar"] if importlib.util.find_spec("xgrammar") else []
    context.set_forkserver_preload([__name__, *tokenizer_modules(tokenizer_source), *grammar])
    return context


def start_fork_server(tokenizer_source: str) -> None:
    """Start the process workers fork from now, so it imports the tokenizer's modules
    while the server imports its own (`lanner serve` calls it as it starts)."""
    from multiprocessing import forkserver

    _forkserver_context(tokenizer_source)
    forkserver.ensure_running()


def _limit_memory(headroom: int) -> None:
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        return  # not Linux: no limit
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = mapped + headroom
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _worker_main(conn: Connection, tokenizer_source: str, trust_remote_code: bool) -> None:
    """Process entry point: load the tokenizer, then prepare one request at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Below the event loop and the engine core: a flood of heavy requests slows their own
    # preparation, not the answers to everyone else.
    os.nice(WORKER_NICENESS)
    try:
        # transformers' own tokenizer, loaded now (chat templates and the other methods
        # requests use), before the memory limit is set.
        tokenizer = transformers_tokenizer(load_tokenizer(tokenizer_source, trust_remote_code))
        _limit_memory(WORKER_MEMORY_HEADROOM)
        gc.collect()
        gc.freeze()  # full collections then scan only a request's objects
    except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the start
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            kind, raw, context = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        try:
            reply: tuple[str, Any] = ("ok", prepare(kind, raw, context, tokenizer))
        except OpenAIError as err:
            reply = ("error", err)
        except MemoryError:
            reply = ("error", bad_request("preparing the request needed more memory than allowed"))
        except Exception:  # noqa: BLE001 - a bug: the parent logs it and answers 500
            reply = ("crash", traceback.format_exc())
        conn.send(reply)


class _Worker:
    def __init__(self, context: Any, tokenizer_source: str, trust_remote_code: bool) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, tokenizer_source, trust_remote_code),
            name="lanner-prepare",
            daemon=True,
        )
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise RuntimeError(f"a request worker did not start within {timeout_s:.0f}s")
        status, message = self.conn.recv()
        if status != "ready":
            self.kill()
            raise ValueError(f"a request worker failed to start: {message}")

    def call(self, job: tuple[str, bytes, PrepareContext], timeout_s: float) -> tuple[str, Any]:
        """Send one job and wait for its reply; ("timeout", None) past the budget."""
        try:
            self.conn.send(job)
            if not self.conn.poll(timeout_s):
                return "timeout", None
            return self.conn.recv()
        except (EOFError, OSError) as err:
            return "crash", f"the worker exited ({type(err).__name__}: {err})"

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class PrepareWorkers:
    """A fixed number of prepare workers; requests wait for a free one."""

    def __init__(
        self, tokenizer_source: str, trust_remote_code: bool, num_workers: int, timeout_s: float
    ) -> None:
        self.tokenizer_source = tokenizer_source
        self.trust_remote_code = trust_remote_code
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.num_replaced = 0  # workers killed past the budget or lost, then replaced
        self._context = _forkserver_context(tokenizer_source)
        # Calls block on a pipe, so each gets a thread; one per worker is all that run.
        self._threads = ThreadPoolExecutor(num_workers, thread_name_prefix="lanner-prepare")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        workers = await asyncio.gather(
            *(
                loop.run_in_executor(self._threads, self._new_worker)
                for _ in range(self.num_workers)
            )
        )
        for worker in workers:
            self._idle.put_nowait(worker)

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._context, self.tokenizer_source, self.trust_remote_code)
        self._workers.add(worker)
        try:
            worker.wait_ready(WORKER_START_TIMEOUT_S)
        except BaseException:
            self._workers.discard(worker)
            raise
        return worker

    async def prepare(
        self, kind: str, raw: bytes, context: PrepareContext
    ) -> PreparedRequest | dict[str, Any]:
        """Prepare a request in a worker (for /tokenize and /detokenize: answer it there);
        raises OpenAIError for the client."""
        if self._idle is None or self._closed:
            raise OpenAIError(503, "the server is starting or stopping", "ServiceUnavailable")
        worker = await self._idle.get()
        # Shielded: a client that goes away must not hand the worker back mid-call.
        task = asyncio.ensure_future(self._run(worker, (kind, raw, context)))
        status, value = await asyncio.shield(task)
        if status == "ok":
            return value
        if status == "error":
            raise value
        if status == "timeout":
            raise bad_request(
                f"preparing this request (parsing, chat template, tokenizing) took longer "
                f"than this server's {self.timeout_s:g} s budget (--prepare-timeout); send a "
                f"shorter or simpler request"
            )
        logger.error("a request worker failed preparing a %s request:\n%s", kind, value)
        raise OpenAIError(500, "internal error while preparing the request", "InternalServerError")

    async def _run(
        self, worker: _Worker, job: tuple[str, bytes, PrepareContext]
    ) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        replace = True
        try:
            status, value = await loop.run_in_executor(
                self._threads, worker.call, job, self.timeout_s
            )
            replace = status in ("timeout", "crash")
            return status, value
        finally:
            if replace:
                asyncio.ensure_future(self._replace(worker))
            else:
                self._idle.put_nowait(worker)  # type: ignore[union-attr]

    async def _replace(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        worker.kill()
        if self._closed:
            return
        self.num_replaced += 1
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                fresh = await loop.run_in_executor(self._threads, self._new_worker)
            except Exception:  # noqa: BLE001 - keep trying: the pool must not shrink
                logger.exception("could not start a request worker; retrying")
                await asyncio.sleep(1.0)
                continue
            self._idle.put_nowait(fresh)  # type: ignore[union-attr]
            return

    def shutdown(self) -> None:
        self._closed = True
        for worker in list(self._workers):
            worker.kill()
        self._workers.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
