"""The router's workers: who they are, whether they are up, how loaded, and which one
a request goes to. A background task polls each worker's /health and /metrics; a worker
that fails is taken out and checked again with exponential backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

from lanner.engine.routing import RouteDecision, RoutingPolicy, WorkerLoad
from lanner.metrics.router import RouterMetrics

logger = logging.getLogger(__name__)

# A worker's queue depth, as lanner (and vLLM) name it in /metrics.
WAITING_METRICS = ("lanner:num_requests_waiting", "vllm:num_requests_waiting")
MAX_METRICS_BYTES = 1 << 20


def normalize_url(url: str) -> str:
    """'http://host:8000/' -> 'http://host:8000'; anything but http(s)://host fails."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError("a worker URL is a string like http://host:8000")
    try:
        parsed = yarl.URL(url.strip())
    except (ValueError, TypeError) as err:
        raise ValueError(f"worker URL {url!r} is not a URL: {err}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"worker URL {url!r} must look like http://host:port")
    if parsed.query_string or parsed.fragment or parsed.user:
        raise ValueError(f"worker URL {url!r} must not carry a query, fragment or user")
    return str(parsed).rstrip("/")


def parse_waiting(text: str) -> int | None:
    """The sum of the worker's num_requests_waiting samples (one per model name)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(WAITING_METRICS):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return int(total) if found else None


@dataclass
class Worker:
    url: str
    healthy: bool = False
    outstanding: int = 0  # forwarded and not finished, counted here
    waiting: int = 0  # the worker's queue depth, as last polled
    consecutive_failures: int = 0
    next_check: float = 0.0  # time.monotonic() of the next health check
    last_error: str | None = None
    removed: bool = False
    # Per-worker things each request would otherwise build anew: the URL of each path
    # forwarded to it, and its metrics' labelled children.
    _endpoints: dict[str, yarl.URL] = field(default_factory=dict, repr=False)
    _children: dict[Any, Any] = field(default_factory=dict, repr=False)

    def endpoint(self, path: str) -> yarl.URL:
        """The URL of `path` (with its query, if any) on this worker; those without a
        query (the proxied endpoints' paths, a handful) are parsed once."""
        url = self._endpoints.get(path)
        if url is None:
            url = yarl.URL(self.url + path)
            if "?" not in path:
                self._endpoints[path] = url
        return url

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "waiting": self.waiting,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class HealthOptions:
    interval_s: float = 2.0  # between checks of a healthy worker (health and load)
    timeout_s: float = 5.0  # for each check
    max_backoff_s: float = 10.0  # longest wait between checks of a failing worker

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "max_backoff_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class WorkerPool:
    def __init__(
        self,
        urls: Iterable[str],
        policy: RoutingPolicy,
        metrics: RouterMetrics,
        health: HealthOptions,
        worker_headers: dict[str, str] | None = None,
    ) -> None:
        self.policy = policy
        self.session: aiohttp.ClientSession | None = None  # set by the router once running
        self.metrics = metrics
        self.health = health
        self.worker_headers = worker_headers or {}
        self.workers: dict[str, Worker] = {}
        self._decision_counters: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        for url in urls:
            self.add(url)

    # -- membership ----------------------------------------------------------------------

    def add(self, url: str) -> Worker:
        url = normalize_url(url)
        if url in self.workers:
            raise ValueError(f"worker {url} is already in the pool")
        worker = self.workers[url] = Worker(url)
        self.metrics.worker_up.labels(url).set(0)
        self.metrics.outstanding.labels(url).set(0)
        self._wake.set()  # check it now, not at the next tick
        return worker

    def remove(self, url: str) -> Worker:
        url = normalize_url(url)
        worker = self.workers.pop(url, None)
        if worker is None:
            raise KeyError(url)
        worker.removed = True
        self.policy.remove_worker(url)
        self.metrics.forget_worker(url)
        return worker

    # -- routing -------------------------------------------------------------------------

    def choose(self, key: str | None, exclude: Iterable[Worker] = ()) -> tuple[Worker, str] | None:
        """A healthy worker for the request (none of `exclude`), and why; None if none."""
        skipped = {w.url for w in exclude}
        healthy = [w for w in self.workers.values() if w.healthy and w.url not in skipped]
        if not healthy:
            return None
        candidates = [WorkerLoad(w.url, w.outstanding, w.waiting) for w in healthy]
        decision: RouteDecision = self.policy.choose(candidates, key)
        counter = self._decision_counters.get(decision.reason)
        if counter is None:
            counter = self._decision_counters[decision.reason] = self.metrics.decisions.labels(
                decision.reason
            )
        counter.inc()
        return self.workers[decision.worker], decision.reason

    def _child(self, worker: Worker, metric: Any, *labels: str) -> Any:
        """`metric`'s child for `worker` (and `labels`), looked up once per worker."""
        key = (id(metric), labels)
        child = worker._children.get(key)
        if child is None:
            child = worker._children[key] = metric.labels(worker.url, *labels)
        return child

    def started(self, worker: Worker) -> None:
        worker.outstanding += 1
        if not worker.removed:
            self._child(worker, self.metrics.outstanding).set(worker.outstanding)

    def finished(self, worker: Worker) -> None:
        worker.outstanding -= 1
        if not worker.removed:
            self._child(worker, self.metrics.outstanding).set(worker.outstanding)

    def answered(self, worker: Worker, status: int) -> None:
        """The client is getting `worker`'s answer, with HTTP `status`."""
        self._child(worker, self.metrics.requests, str(status)).inc()

    def failed(self, worker: Worker, error: str, certain: bool) -> None:
        """A request to `worker` failed. `certain` (it refused the connection, or said
        it is down): out at once; otherwise (say, a reused connection dropped) it stays
        in and is checked now."""
        self.metrics.failures.labels(worker.url).inc()
        worker.last_error = error
        if certain:
            self._mark_down(worker, error)
        else:
            worker.next_check = 0.0
            self._wake.set()

    def _mark_down(self, worker: Worker, error: str) -> None:
        worker.consecutive_failures += 1
        worker.last_error = error
        backoff = self.health.interval_s * 2 ** (worker.consecutive_failures - 1)
        worker.next_check = time.monotonic() + min(self.health.max_backoff_s, backoff)
        if worker.healthy:
            logger.warning("worker %s is down: %s", worker.url, error)
            # A worker that comes back has lost its cache: forget what it held.
            self.policy.remove_worker(worker.url)
        worker.healthy = False
        if not worker.removed:
            self.metrics.worker_up.labels(worker.url).set(0)

    # -- health --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll_forever(), name="lanner-router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def _poll_forever(self) -> None:
        """Each due worker's check runs as its own task, so a slow one delays no other."""
        running: dict[str, asyncio.Task[None]] = {}

        def done(url: str) -> None:
            running.pop(url, None)
            self._wake.set()

        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                for worker in list(self.workers.values()):
                    if worker.next_check <= now and worker.url not in running:
                        task = asyncio.create_task(self.check(worker))
                        running[worker.url] = task
                        task.add_done_callback(lambda _, url=worker.url: done(url))
                upcoming = [w.next_check for w in self.workers.values() if w.url not in running]
                wait = min(upcoming) - now if upcoming else self.health.interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, wait))
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    async def check(self, worker: Worker) -> None:
        """GET /health, then /metrics for the queue depth; never raises."""
        worker.next_check = time.monotonic() + self.health.interval_s  # none run twice
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.health.timeout_s)
        try:
            async with self.session.get(
                worker.url + "/health", timeout=timeout, headers=self.worker_headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"/health answered HTTP {response.status}")
        except Exception as err:  # noqa: BLE001 - any failure means the worker is down
            if not worker.removed:
                self._mark_down(worker, f"{type(err).__name__}: {err}"[:300])
            return
        if worker.removed:
            return
        if not worker.healthy:
            logger.info("worker %s is up", worker.url)
        worker.healthy = True
        worker.consecutive_failures = 0
        worker.last_error = None
        self.metrics.worker_up.labels(worker.url).set(1)
        await self._poll_load(worker, timeout)

    async def _poll_load(self, worker: Worker, timeout: aiohttp.ClientTimeout) -> None:
        assert self.session is not None
        try:
            async with self.session.get(
                worker.url + "/metrics", timeout=timeout, headers=self.worker_headers
            ) as response:
                if response.status != 200:
                    return
                text = bytearray()
                async for chunk in response.content.iter_any():
                    text += chunk
                    if len(text) > MAX_METRICS_BYTES:
                        return
        except (aiohttp.ClientError, TimeoutError):
            return  # load stays as last known; health decides up or down
        waiting = parse_waiting(text.decode("utf-8", errors="replace"))
        if waiting is not None and not worker.removed:
            worker.waiting = waiting
            self.metrics.waiting.labels(worker.url).set(waiting)
