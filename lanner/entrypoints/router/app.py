"""`lanner router`: an OpenAI-compatible front over replicas (FastAPI on uvicorn, aiohttp
to the workers). Each request goes to one worker, picked by a routing policy, and its
response streams back byte for byte; a worker that fails before its first byte is
replaced by another, once.

aiohttp, not httpx, for the workers: httpx's connection pool walks every connection on
each request and each close, which at 200 streams was most of the router's time."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import lanner
from lanner.engine.routing import CacheAwareConfig, make_policy
from lanner.entrypoints.http_guards import (
    ApiKeyMiddleware,
    CatchAllMiddleware,
    HostCheckMiddleware,
    OpenAIError,
    error_body,
    read_body,
    receive_body,
    send_json,
)
from lanner.entrypoints.router.keys import route_key
from lanner.entrypoints.router.workers import HealthOptions, Worker, WorkerPool
from lanner.metrics.router import RouterMetrics

logger = logging.getLogger(__name__)

# A request is tried on at most this many workers (the first, then one retry).
MAX_ATTEMPTS = 2
# Statuses that mean "this worker cannot serve now", not "this request is wrong".
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_RESPONSE_BYTES = 256 << 20  # a whole (non-streamed) response the router holds
MAX_WORKER_BODY_BYTES = 64 << 10  # a POST/DELETE /workers body
# Never forwarded: they describe one connection, not the request (RFC 9110 7.6.1), or
# are set anew for the next hop.
_HOP_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
        "content-length", "expect",
    }
)  # fmt: skip
_RESPONSE_SKIP = frozenset(h.encode() for h in _HOP_HEADERS | {"date", "server"})
# ASGI servers give header names in lower case (the ASGI spec says so).
_REQUEST_SKIP = frozenset(h.encode() for h in _HOP_HEADERS)


@dataclass(frozen=True)
class RouterOptions:
    worker_urls: list[str]
    policy: str = "cache_aware"
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    health: HealthOptions = field(default_factory=HealthOptions)
    api_key: str | None = None
    worker_api_key: str | None = None
    allowed_hosts: list[str] | None = None  # None: no Host check
    max_body_bytes: int = 8 << 20
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"the connect timeout must be > 0, got {self.connect_timeout_s}")


class RouterState:
    """What every request handler shares: the options, the workers, the HTTP session."""

    def __init__(self, options: RouterOptions) -> None:
        self.options = options
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None  # made in the running loop
        worker_headers = (
            {"Authorization": f"Bearer {options.worker_api_key}"} if options.worker_api_key else {}
        )
        self.pool = WorkerPool(
            options.worker_urls,
            make_policy(options.policy, options.cache_aware),
            self.metrics,
            options.health,
            worker_headers,
        )

    async def open(self) -> None:
        # No connection limit (a stream holds its connection throughout); keep-alive
        # shorter than uvicorn's 5 s, so a pooled connection is never one the worker is
        # closing; bytes pass as they come (no decompression).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        self.pool.session = self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def upstream_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
        kept = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k not in _REQUEST_SKIP
        ]
        if self.options.worker_api_key:
            kept = [(k, v) for k, v in kept if k.lower() != "authorization"]
            kept.append(("Authorization", f"Bearer {self.options.worker_api_key}"))
        return kept


def _response_headers(upstream: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in upstream.raw_headers if k.lower() not in _RESPONSE_SKIP]


def _describe(err: BaseException) -> str:
    text = str(err) or "no detail"
    return f"{type(err).__name__}: {text}"[:300]


def _sse_error(message: str) -> bytes:
    body = error_body(message, "BadGatewayError", None, 502)
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class UpstreamTooLarge(aiohttp.ClientError):
    """A whole (non-streamed) worker response past MAX_RESPONSE_BYTES."""


async def _read_capped(upstream: aiohttp.ClientResponse, limit: int) -> bytes:
    content = bytearray()
    async for chunk in upstream.content.iter_any():
        content += chunk
        if len(content) > limit:
            raise UpstreamTooLarge(f"the worker's response passed {limit} bytes")
    return bytes(content)


class Forward:
    """Forwards one request and relays the answer over the client's own connection: a
    client that goes away cancels the forward, which closes the worker's stream, which
    makes the worker abort the request."""

    def __init__(
        self,
        state: RouterState,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        key: str | None,
        arrival: float,
    ) -> None:
        self.state = state
        self.method = method
        self.path = path
        self.content = body
        self.forward_headers = headers
        self.key = key
        self.arrival = arrival

    async def run(self, receive: Any, send: Any) -> None:
        # The forward runs in this task; a second one only waits for the client to go,
        # and cancels this one if it does (one task a request, not two and a wait).
        task = asyncio.current_task()
        assert task is not None
        self.started = False  # whether the client has had a response start
        self.done = False  # the response is complete: a disconnect now is no news
        self.client_left = False
        watch = asyncio.create_task(self._cancel_on_disconnect(receive, task))
        try:
            await self._forward(send)
        except asyncio.CancelledError:
            if not self.client_left:
                raise
            task.uncancel()  # the client went away: nothing to answer, nothing to raise
        except Exception as error:  # noqa: BLE001 - logged; the client gets a 500
            logger.error("unexpected error forwarding %s", self.path, exc_info=error)
            if not self.started:
                await send_json(send, 500, _INTERNAL_ERROR)
        finally:
            self.done = True
            watch.cancel()

    async def _cancel_on_disconnect(self, receive: Any, task: asyncio.Task) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self.done:
            self.client_left = True
            task.cancel()

    async def _forward(self, send: Any) -> None:
        pool, metrics = self.state.pool, self.state.metrics
        tried: list[Worker] = []
        errors: list[str] = []
        while len(tried) < MAX_ATTEMPTS:
            picked = pool.choose(self.key, exclude=tried)
            if picked is None:
                break
            worker, _ = picked
            if tried:
                metrics.retries.inc()
            tried.append(worker)
            error = await self._attempt(worker, send)
            if error is None:
                return
            errors.append(error)
        self.started = True  # one of the error answers below
        if not errors:
            metrics.no_worker.inc()
            message = (
                "no worker is healthy; see the router's /health, or add one with POST /workers"
            )
            await send_json(
                send, 503, error_body(message, "ServiceUnavailableError", None, 503),
                {"Retry-After": "1"},
            )  # fmt: skip
            return
        message = f"the request failed on {len(errors)} worker(s): " + "; ".join(errors)
        await send_json(send, 502, error_body(message, "BadGatewayError", None, 502))

    async def _attempt(self, worker: Worker, send: Any) -> str | None:
        """Send the request to `worker`. None once the client has its answer; the error
        when the worker failed before anything reached the client (so a retry is safe)."""
        state, pool = self.state, self.state.pool
        assert state.session is not None
        pool.started(worker)
        upstream: aiohttp.ClientResponse | None = None
        finished = False  # read to its end: the connection may be reused
        try:
            try:
                upstream = await state.session.request(
                    self.method, worker.endpoint(self.path), data=self.content or None,
                    headers=self.forward_headers, allow_redirects=False,
                )  # fmt: skip
                status = upstream.status
                if status in RETRY_STATUSES:
                    detail = (await _read_capped(upstream, 4096)).decode(errors="replace")
                    finished = True
                    pool.failed(worker, f"HTTP {status}", certain=status == 503)
                    return f"{worker.url} answered HTTP {status}: {detail[:300]}"
                streaming = upstream.content_type == "text/event-stream"
                if streaming:
                    content = upstream.content
                    first = await content.readany()
                else:
                    first = await _read_capped(upstream, MAX_RESPONSE_BYTES)
                    finished = True
            except (aiohttp.ClientError, TimeoutError) as err:
                certain = isinstance(err, aiohttp.ClientConnectorError | TimeoutError)
                pool.failed(worker, _describe(err), certain=certain)
                return f"{worker.url}: {_describe(err)}"
            # From here on the client hears from this worker, whatever happens.
            pool.answered(worker, status)
            state.metrics.first_byte.observe(time.monotonic() - self.arrival)
            headers = _response_headers(upstream)
            if not streaming:
                headers.append((b"content-length", str(len(first)).encode()))
            self.started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if not streaming:
                self.done = True
                await send({"type": "http.response.body", "body": first})
                return None
            # Each chunk as it comes, as it came: no parsing, one write.
            chunk = first
            try:
                while chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = await content.readany()
                finished = True
            except aiohttp.ClientError as err:
                pool.failed(worker, _describe(err), certain=False)
                message = f"worker {worker.url} failed mid-stream: {_describe(err)}"
                await send({"type": "http.response.body", "body": _sse_error(message),
                            "more_body": True})  # fmt: skip
            self.done = True
            await send({"type": "http.response.body", "body": b""})
            return None
        finally:
            pool.finished(worker)
            if upstream is not None:
                # An unfinished stream must close its connection: that is how the worker
                # learns the client left, and aborts.
                if finished:
                    upstream.release()
                else:
                    upstream.close()


_INTERNAL_ERROR = error_body("internal router error (logged)", "InternalServerError", None, 500)


def _worker_url_from(body: bytes, query_url: str | None) -> str:
    if query_url:
        return query_url
    try:
        payload = json.loads(body) if body else None
    except (ValueError, RecursionError):
        raise OpenAIError(400, "the body must be JSON like {\"url\": \"http://host:port\"}",
                        "BadRequestError", "url") from None  # fmt: skip
    if not isinstance(payload, dict) or not isinstance(payload.get("url"), str):
        raise OpenAIError(400, "give the worker as {\"url\": \"http://host:port\"} or ?url=",
                        "BadRequestError", "url")  # fmt: skip
    return payload["url"]


# The OpenAI endpoints the router forwards, and the method each takes.
PROXIED = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET"}


class RouterApp:
    """The ASGI app uvicorn serves. The forwarded endpoints take a short path of plain
    ASGI (no framework layer sits in the way of each streamed chunk); everything else
    (health, metrics, workers, errors) goes through FastAPI."""

    def __init__(self, state: RouterState, fastapi_app: FastAPI) -> None:
        self.state = state
        self.fastapi = fastapi_app
        self._framework = CatchAllMiddleware(fastapi_app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in PROXIED:
            await self.forward(scope, receive, send)
        else:
            await self._framework(scope, receive, send)

    async def forward(self, scope: dict, receive: Any, send: Any) -> None:
        arrival = time.monotonic()
        path, method = scope["path"], scope["method"]
        if method != PROXIED[path]:
            body = error_body(f"{path} takes {PROXIED[path]}, not {method}",
                              "MethodNotAllowedError", None, 405)  # fmt: skip
            await send_json(send, 405, body, {"Allow": PROXIED[path]})
            return
        options = self.state.options
        try:
            body = await receive_body(scope, receive, options.max_body_bytes, "--max-body-bytes")
        except OpenAIError as err:
            await send_json(send, err.status, err.body(), err.headers)
            return
        except ClientDisconnect:
            return
        key = route_key(path, body) if options.policy == "cache_aware" else None
        headers = self.state.upstream_headers(scope["headers"])
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        await Forward(self.state, method, path, body, headers, key, arrival).run(receive, send)


def build_router_app(options: RouterOptions) -> Any:
    """The router as an ASGI app (API key and Host checks outermost)."""
    state = RouterState(options)
    pool = state.pool

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        await pool.check_all()  # route from the first request on
        pool.start()
        up = [w.url for w in pool.workers.values() if w.healthy]
        logger.info("routing with %s over %d worker(s), %d up", options.policy,
                    len(pool.workers), len(up))  # fmt: skip
        try:
            yield
        finally:
            await pool.stop()
            await state.close()

    app = FastAPI(title="lanner router", version=lanner.__version__, lifespan=lifespan)
    app.state.router = state

    @app.exception_handler(OpenAIError)
    async def _http_error(_: Request, err: OpenAIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(
            err.status_code, "BadRequestError"
        )
        return JSONResponse(
            error_body(str(err.detail), kind, None, err.status_code),
            err.status_code,
            headers=dict(err.headers or {}),
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = [w.describe() for w in pool.workers.values()]
        up = sum(1 for w in workers if w["healthy"])
        body: dict[str, Any] = {
            "status": "ok" if up else "unavailable",
            "workers_up": up,
            "workers": workers,
        }
        if not up:
            body.update(error_body("no worker is healthy", "ServiceUnavailableError", None, 503))
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": lanner.__version__}

    @app.get("/workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": [w.describe() for w in pool.workers.values()]}

    @app.post("/workers")
    async def add_worker(request: Request) -> JSONResponse:
        url = _worker_url_from(await read_body(request, MAX_WORKER_BODY_BYTES, "a fixed limit"),
                               request.query_params.get("url"))  # fmt: skip
        try:
            worker = pool.add(url)
        except ValueError as err:
            status = 409 if "already" in str(err) else 400
            kind = "ConflictError" if status == 409 else "BadRequestError"
            raise OpenAIError(status, str(err), kind, "url") from None
        await pool.check(worker)  # say at once whether it answers
        return JSONResponse({"added": worker.url, "worker": worker.describe()}, status_code=201)

    @app.delete("/workers")
    async def remove_worker(request: Request) -> dict[str, Any]:
        url = _worker_url_from(await read_body(request, MAX_WORKER_BODY_BYTES, "a fixed limit"),
                               request.query_params.get("url"))  # fmt: skip
        try:
            worker = pool.remove(url)
        except ValueError as err:
            raise OpenAIError(400, str(err), "BadRequestError", "url") from None
        except KeyError:
            raise OpenAIError(404, f"worker {url} is not in the pool", "NotFoundError",
                            "url") from None  # fmt: skip
        return {"removed": worker.url, "outstanding": worker.outstanding}

    served: Any = RouterApp(state, app)
    if options.api_key:
        served = ApiKeyMiddleware(served, api_key=options.api_key)
    if options.allowed_hosts is not None:
        served = HostCheckMiddleware(served, allowed_hosts=options.allowed_hosts)
    return served


def run_router(
    options: RouterOptions, host: str, port: int, log_level: str = "info", access_log: bool = True
) -> int:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first."""
    app = build_router_app(options)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
        access_log=access_log,
        # The router reads no client address; uvicorn's X-Forwarded-For rewrite would be
        # one more layer on every request.
        proxy_headers=False,
    )  # fmt: skip
    uvicorn.Server(config).run()  # on uvloop and httptools when installed, as uvicorn picks
    return 0
