"""The router's parts in one process: route keys of request bodies, Host and URL checks,
the queue-depth scrape, and the proxy's retry and error paths against small fake workers
on real sockets (refused connections, 503s, 429s, streams that break)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.engine.routing import MAX_KEY_CHARS, text_key, token_key
from lanner.entrypoints.cli import build_parser
from lanner.entrypoints.http_guards import api_key_from, default_allowed_hosts, host_name
from lanner.entrypoints.router.app import RouterApp, RouterOptions, build_router_app
from lanner.entrypoints.router.keys import MAX_PARSED_BODY_BYTES, route_key
from lanner.entrypoints.router.workers import HealthOptions, normalize_url, parse_waiting
from tests.entrypoints.server_utils import free_port

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
A, B = "http://worker-a:8000", "http://worker-b:8000"


def key_of(path: str, body: Any) -> str | None:
    return route_key(path, json.dumps(body).encode())


def test_route_keys_of_completions_and_chats() -> None:
    assert key_of(COMPLETIONS, {"prompt": "hello"}) == text_key("hello")
    assert key_of(COMPLETIONS, {"prompt": ["first", "second"]}) == text_key("first")
    assert key_of(COMPLETIONS, {"prompt": [5, 6, 7]}) == token_key([5, 6, 7])
    assert key_of(COMPLETIONS, {"prompt": [[5, 6], [7]]}) == token_key([5, 6])
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    longer = {"messages": [*chat["messages"], {"role": "assistant", "content": "A"}]}
    assert key_of(CHAT, longer).startswith(key_of(CHAT, chat))  # a later turn extends it
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert key_of(CHAT, parts) == key_of(CHAT, {"messages": [{"role": "user", "content": "U"}]})
    # Not what the endpoint takes: no key (the worker answers with the error).
    for body in ({"prompt": ""}, {"prompt": [True, 1]}, {"prompt": [1.5]}, [1, 2], "x", None,
                 {"messages": "hi"}, {"messages": [1]}, {"prompt": {"a": 1}}):  # fmt: skip
        assert key_of(CHAT if "messages" in str(body) else COMPLETIONS, body) is None
    assert route_key(COMPLETIONS, b"{not json") is None
    assert route_key(COMPLETIONS, b"[" * 100_000) is None  # too deep for json: no key
    huge = json.dumps({"prompt": "x" * MAX_PARSED_BODY_BYTES}).encode()
    assert route_key(COMPLETIONS, huge) is None  # routed by load, never parsed
    long_chat = {"messages": [{"role": "user", "content": "y" * 1000}] * 100}
    assert len(key_of(CHAT, long_chat)) == MAX_KEY_CHARS


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["prompt", "messages", "role", "content", "text", "type", "x"]),
            children,
            max_size=4,
        )
    ),  # fmt: skip
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.sampled_from([COMPLETIONS, CHAT]))
def test_route_key_takes_any_json_without_raising(body: Any, path: str) -> None:
    key = route_key(path, json.dumps(body).encode())
    assert key is None or (isinstance(key, str) and 1 < len(key) <= MAX_KEY_CHARS)


def test_host_checks_and_worker_urls() -> None:
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1" and host_name("::1") == "::1"
    assert host_name("LocalHost") == "localhost"
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("10.1.2.3") is None
    assert normalize_url("http://h:1/") == "http://h:1"
    for bad in ("ftp://h", "h:1", "http://", "http://h:1/?x=1", 7):
        with pytest.raises(ValueError, match="worker URL|a worker URL"):
            normalize_url(bad)  # type: ignore[arg-type]


def test_api_key_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANNER_API_KEY", raising=False)
    assert api_key_from(None) is None
    monkeypatch.setenv("LANNER_API_KEY", "from-env")
    assert api_key_from(None) == "from-env" and api_key_from("flag") == "flag"


def test_queue_depth_scrape_sums_lanner_and_vllm_samples() -> None:
    text = (
        "# HELP lanner:num_requests_waiting Sequences waiting.\n"
        'lanner:num_requests_waiting{model_name="a"} 3.0\n'
        'lanner:num_requests_waiting{model_name="b"} 2.0\n'
        'vllm:num_requests_waiting{model_name="c",engine="0"} 4.0\n'
        "lanner:num_requests_running 9.0\n"
    )
    assert parse_waiting(text) == 9
    assert parse_waiting("lanner:num_requests_running 1.0\n") is None


def test_router_and_data_parallel_flags() -> None:
    args = build_parser().parse_args(
        ["router", "--worker-urls", A, B, "--policy", "least_load", "--cache-threshold", "0.7",
         "--health-check-interval", "0.5", "--allowed-hosts", "*"]
    )  # fmt: skip
    assert (args.worker_urls, args.policy, args.cache_threshold) == ([A, B], "least_load", 0.7)
    assert (args.host, args.port, args.health_check_interval) == ("127.0.0.1", 8000, 0.5)
    assert args.allowed_hosts == ["*"] and args.max_body_bytes == 8 << 20
    serve = build_parser().parse_args(["serve", "--data-parallel-size", "2"])
    assert (serve.data_parallel_size, serve.data_parallel_policy) == (2, "cache_aware")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--policy", "random"])


# -- the proxy against simulated workers --------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NAME = web.AppKey("name", str)


async def ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"served": request.app[NAME]})


async def down(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": {"message": "engine core is not running"}}, status=503)


async def broken_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()  # the worker dies mid-stream
    return response


@contextlib.asynccontextmanager
async def fake_worker(name: str, handler: Handler) -> AsyncIterator[str]:
    """A real HTTP server on a free port: /health and /metrics answer, the OpenAI
    endpoints run `handler`."""
    app = web.Application()
    app[NAME] = name

    async def health(_: web.Request) -> web.StreamResponse:
        return web.json_response({})

    async def metrics(_: web.Request) -> web.StreamResponse:
        return web.Response(text="lanner:num_requests_waiting 0.0\n")

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_router(**options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """`lanner router` served by uvicorn in this loop; yields a client for it and the
    router's ASGI app."""
    settings = {"policy": "round_robin", "health": HealthOptions(interval_s=60.0), **options}
    app = build_router_app(RouterOptions(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, app
    finally:
        server.should_exit = True
        await task


def router_of(app: Any) -> RouterApp:
    while not isinstance(app, RouterApp):
        app = app.app  # through the API key and Host checks
    return app


def test_a_worker_that_fails_before_its_first_byte_is_replaced_once() -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def main() -> None:
        async with (
            fake_worker("b", ok) as b,
            running_router(worker_urls=[refused, b]) as (client, app),
        ):
            router_of(app).state.pool.workers[refused].healthy = True  # as if it just died
            for _ in range(3):  # round robin picks the dead one first
                response = await client.post(COMPLETIONS, json={"prompt": "x"})
                assert response.status_code == 200 and response.json() == {"served": "b"}
            health = (await client.get("/health")).json()
            assert {w["url"]: w["healthy"] for w in health["workers"]} == {refused: False, b: True}
            metrics = (await client.get("/metrics")).text
            assert "lanner:router_retries_total 1.0" in metrics
            assert f'lanner:router_worker_failures_total{{worker="{refused}"}} 1.0' in metrics

    asyncio.run(main())


def test_503_is_retried_and_a_second_failure_is_a_clear_502() -> None:
    async def main() -> None:
        async with (
            fake_worker("a", down) as a,
            fake_worker("b", down) as b,
            running_router(worker_urls=[a, b]) as (client, _),
        ):
            response = await client.post(COMPLETIONS, json={"prompt": "x"})
            assert response.status_code == 502
            error = response.json()["error"]
            assert error["type"] == "BadGatewayError" and error["code"] == 502
            assert "2 worker(s)" in error["message"] and "HTTP 503" in error["message"]
            # Both are out now: the next request hears so at once, with Retry-After.
            response = await client.post(COMPLETIONS, json={"prompt": "x"})
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert (await client.get("/health")).status_code == 503

    asyncio.run(main())


def test_client_errors_and_their_headers_pass_through_unretried() -> None:
    calls: list[tuple[dict[str, str], bytes]] = []

    async def busy(request: web.Request) -> web.StreamResponse:
        calls.append((dict(request.headers), await request.read()))
        return web.json_response({"error": {"code": 429}}, status=429,
                                 headers={"Retry-After": "3"})  # fmt: skip

    async def main() -> None:
        async with fake_worker("a", busy) as a, running_router(worker_urls=[a]) as (client, _):
            response = await client.post(COMPLETIONS, content=b'{"prompt": "x"}',
                                         headers={"x-custom": "kept"})  # fmt: skip
            assert response.status_code == 429 and response.headers["retry-after"] == "3"
            [(headers, body)] = calls
            assert headers["x-custom"] == "kept" and body == b'{"prompt": "x"}'

    asyncio.run(main())


def test_a_stream_that_breaks_after_its_first_byte_ends_with_an_error_event() -> None:
    async def main() -> None:
        async with (
            fake_worker("a", broken_stream) as a,
            fake_worker("b", ok) as b,
            running_router(worker_urls=[a, b]) as (client, _),
        ):
            response = await client.post(COMPLETIONS, json={"prompt": "x", "stream": True})
            assert response.status_code == 200
            events = [line for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[0] == 'data: {"choices": [{"text": "a"}]}'
            assert "failed mid-stream" in json.loads(events[1][6:])["error"]["message"]
            assert events[2] == "data: [DONE]"
            assert "lanner:router_retries_total 0.0" in (await client.get("/metrics")).text

    asyncio.run(main())


def test_api_key_host_check_and_unexpected_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with (
            fake_worker("a", ok) as a,
            running_router(worker_urls=[a], api_key="sekret",
                           allowed_hosts=["127.0.0.1"]) as (client, app),
        ):  # fmt: skip
            key = {"Authorization": "Bearer sekret"}
            assert (await client.get("/health")).status_code == 200  # open without the key
            denied = await client.post(COMPLETIONS, json={"prompt": "x"})
            assert denied.status_code == 401
            assert denied.json()["error"]["type"] == "AuthenticationError"
            assert (await client.post(COMPLETIONS, json={"prompt": "x"}, headers=key)).json() == {
                "served": "a"
            }
            rebound = await client.get("/health", headers={"host": "evil.example"})
            assert rebound.status_code == 400
            wrong = await client.get(COMPLETIONS, headers=key)
            assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"

            def bug(*_: Any, **__: Any) -> None:
                raise RuntimeError("a bug in the router")

            monkeypatch.setattr(router_of(app).state.pool, "choose", bug)
            crashed = await client.post(COMPLETIONS, json={"prompt": "x"}, headers=key)
            assert crashed.status_code == 500
            assert crashed.json()["error"] == {"message": "internal router error (logged)",
                                               "type": "InternalServerError", "param": None,
                                               "code": 500}  # fmt: skip
            # The connection (kept alive by the client) still serves the next request.
            assert (await client.get("/health")).status_code == 200

    asyncio.run(main())


def test_a_client_that_leaves_before_the_first_byte_closes_the_workers_request() -> None:
    """The forward runs in the request's own task; the watcher that cancels it when the
    client goes must close the worker's connection even while the worker is silent (a
    long prefill), and leave the router's count of outstanding requests at 0."""
    closed = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(1500):  # never a first token; watch for the router closing
            if request.transport is None or request.transport.is_closing():
                closed.set()
                break
            await asyncio.sleep(0.02)
        return response

    async def main() -> None:
        async with (
            fake_worker("a", silent) as a,
            running_router(worker_urls=[a]) as (client, app),
        ):
            with pytest.raises(httpx.ReadTimeout):
                await client.post(COMPLETIONS, json={"prompt": "x", "stream": True},
                                  timeout=httpx.Timeout(30, read=0.3))  # fmt: skip
            await asyncio.wait_for(closed.wait(), timeout=5)
            worker = router_of(app).state.pool.workers[a]
            for _ in range(100):
                if worker.outstanding == 0:
                    break
                await asyncio.sleep(0.01)
            assert worker.outstanding == 0

            # A chunked upload (no Content-Length) is counted as it arrives.
            async def upload() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b" " * (1 << 20)

            huge = await client.post(COMPLETIONS, content=upload())
            assert huge.status_code == 413
            assert huge.json()["error"]["type"] == "RequestTooLargeError"

    asyncio.run(main())
