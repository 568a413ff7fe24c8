"""The router's parts without processes: route keys of request bodies, Host and URL
checks, the queue-depth scrape, and the proxy's retry and error paths against workers
simulated with httpx.MockTransport (refused connections, 503s, streams that break)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.engine.routing import MAX_KEY_CHARS, text_key, token_key
from lanner.entrypoints.http_guards import api_key_from, default_allowed_hosts, host_name
from lanner.entrypoints.router.app import RouterOptions, build_router_app
from lanner.entrypoints.router.keys import MAX_PARSED_BODY_BYTES, route_key
from lanner.entrypoints.router.workers import HealthOptions, normalize_url, parse_waiting

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


# -- the proxy against simulated workers --------------------------------------------------

Handler = Callable[[httpx.Request], Any]


def run_router(
    handlers: dict[str, Handler], scenario: Callable[[httpx.AsyncClient], Any], **options: Any
) -> Any:
    """Build a router over workers whose answers `handlers` give (per worker URL, for
    the proxied endpoints; /health and /metrics answer 200), run its lifespan, and run
    `scenario` against it."""

    async def route(request: httpx.Request) -> httpx.Response:
        worker = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/health":
            return httpx.Response(200, json={})
        if request.url.path == "/metrics":
            return httpx.Response(200, text="lanner:num_requests_waiting 0.0\n")
        result = handlers[worker](request)
        return await result if asyncio.iscoroutine(result) else result

    settings = {"worker_urls": list(handlers), "policy": "round_robin",
                "health": HealthOptions(interval_s=60.0), **options}  # fmt: skip
    app = build_router_app(RouterOptions(**settings), transport=httpx.MockTransport(route))

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await scenario(c)

    return asyncio.run(main())


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """A JSON response that arrives as a stream, as a real worker's does."""

    async def chunks() -> AsyncIterator[bytes]:
        yield json.dumps(body).encode()

    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.Response(status, headers=headers, content=chunks())


def ok(request: httpx.Request) -> httpx.Response:
    return answer(200, {"served": str(request.url.host)})


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_a_worker_that_fails_before_its_first_byte_is_replaced_once() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for _ in range(3):  # round robin would pick worker-a first at least once
            response = await client.post(COMPLETIONS, json={"prompt": "x"})
            assert response.status_code == 200 and response.json() == {"served": "worker-b"}
        health = (await client.get("/health")).json()
        assert {w["url"]: w["healthy"] for w in health["workers"]} == {A: False, B: True}
        metrics = (await client.get("/metrics")).text
        assert "lanner:router_retries_total 1.0" in metrics
        assert f'lanner:router_worker_failures_total{{worker="{A}"}} 1.0' in metrics

    run_router({A: refuse, B: ok}, scenario)


def test_503_is_retried_and_a_second_failure_is_a_clear_502() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return answer(503, {"error": {"message": "engine core is not running"}})

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post(COMPLETIONS, json={"prompt": "x"})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "BadGatewayError" and error["code"] == 502
        assert "2 worker(s)" in error["message"] and "HTTP 503" in error["message"]
        assert "connection refused" in error["message"]
        # Both are out now: the next request hears so at once, with Retry-After.
        response = await client.post(COMPLETIONS, json={"prompt": "x"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert (await client.get("/health")).status_code == 503

    run_router({A: down, B: refuse}, scenario)


def test_client_errors_and_their_headers_pass_through_unretried() -> None:
    calls = []

    def busy(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answer(429, {"error": {"code": 429}}, {"Retry-After": "3"})

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post(COMPLETIONS, json={"prompt": "x"},
                                     headers={"x-custom": "kept"})  # fmt: skip
        assert response.status_code == 429 and response.headers["retry-after"] == "3"
        assert len(calls) == 1 and calls[0].headers["x-custom"] == "kept"
        assert calls[0].content == b'{"prompt":"x"}'  # the body travels unchanged

    run_router({A: busy}, scenario)


def test_a_stream_that_breaks_after_its_first_byte_ends_with_an_error_event() -> None:
    async def broken(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"choices": [{"text": "a"}]}\n\n'
            raise httpx.ReadError("connection reset", request=request)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post(COMPLETIONS, json={"prompt": "x", "stream": True})
        assert response.status_code == 200
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[0] == 'data: {"choices": [{"text": "a"}]}'
        assert "failed mid-stream" in json.loads(events[1][6:])["error"]["message"]
        assert events[2] == "data: [DONE]"
        assert "lanner:router_retries_total 0.0" in (await client.get("/metrics")).text

    run_router({A: broken, B: ok}, scenario)


def test_api_key_and_unexpected_errors() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200  # open without the key
        denied = await client.post(COMPLETIONS, json={"prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "AuthenticationError"
        allowed = await client.post(COMPLETIONS, json={"prompt": "x"},
                                    headers={"Authorization": "Bearer sekret"})  # fmt: skip
        assert allowed.status_code == 500  # the worker's handler below raised
        assert allowed.json()["error"] == {"message": "internal router error (logged)",
                                           "type": "InternalServerError", "param": None,
                                           "code": 500}  # fmt: skip

    def crash(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug, not a worker failure")

    run_router({A: crash}, scenario, api_key="sekret")
