"""`lanner router` end to end: three real `lanner serve` replicas of the demo model (small
KV caches) behind a real router process. The openai client works through it, outputs
equal a replica's, cache_aware keeps a prefix on its worker, errors are OpenAI-shaped,
a disconnect aborts on the worker, and a replica killed mid-run loses no request that
had not started streaming, then serves again once restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from lanner.bench.server_metrics import scrape_metrics as scrape
from lanner.engine.config import DEFAULT_MODEL_DIR
from tests.entrypoints.server_utils import ServerProcess, free_port

MODEL = "lanner-demo"
# Small caches (128 blocks of 4 tokens each), so what a worker caches matters.
REPLICA_ARGS = ["--max-model-len", "512", "--num-gpu-blocks-override", "128"]
ROUTER_ARGS = [
    "--policy", "cache_aware", "--health-check-interval", "0.2",
    "--health-check-max-backoff", "0.5", "--max-body-bytes", "65536",
]  # fmt: skip


class RouterProcess(ServerProcess):
    """`lanner router` as a subprocess (ServerProcess's readiness, logs and teardown)."""

    def __init__(self, worker_urls: list[str], args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "lanner.entrypoints.cli", "--log-level", "WARNING",
            "router", "--worker-urls", *worker_urls, *args,
            "--host", "127.0.0.1", "--port", str(self.port), "--uvicorn-log-level", "warning",
        ]  # fmt: skip
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )


@dataclass
class Fleet:
    replicas: list[ServerProcess]
    router: RouterProcess
    logs: Path


def health(router: RouterProcess) -> dict[str, bool]:
    body = httpx.get(f"{router.url}/health", timeout=5).json()
    return {w["url"]: w["healthy"] for w in body["workers"]}


def wait_for(condition, timeout_s: float = 15.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("router_logs")
    with pytest.MonkeyPatch.context() as env:
        # Three replicas share two cores: one thread each (spinning OpenMP threads of
        # oversubscribed processes turn 0.15 s requests into seconds).
        env.setenv("OMP_NUM_THREADS", "1")
        replicas = [
            ServerProcess(DEFAULT_MODEL_DIR, REPLICA_ARGS, logs / f"replica{i}.log")
            for i in range(3)
        ]
    router = RouterProcess([r.url for r in replicas], ROUTER_ARGS, logs / "router.log")
    fleet = Fleet(replicas, router, logs)
    try:
        for process in (*replicas, router):
            process.wait_ready()
        wait_for(lambda: all(health(router).values()), what="all three workers up")
        yield fleet
    finally:
        for process in (router, *fleet.replicas):
            process.stop()


def served(fleet: Fleet) -> dict[str, float]:
    """Requests the router forwarded, per worker (any status)."""
    counts = {r.url: 0.0 for r in fleet.replicas}
    for name, value in scrape(fleet.router.url).items():
        if name.startswith("lanner:router_requests_total{"):
            worker = name.split("worker=", 1)[1].rstrip("}")
            counts[worker] = counts.get(worker, 0.0) + value
    return counts


def complete(url: str, prompt: str, max_tokens: int = 12, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_openai_client_through_the_router_equals_a_replica(fleet: Fleet) -> None:
    routed = openai.OpenAI(base_url=f"{fleet.router.url}/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=f"{fleet.replicas[0].url}/v1", api_key="unused",
                           max_retries=0)  # fmt: skip
    assert [m.id for m in routed.models.list().data] == [MODEL]
    for prompt in ("def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:"):
        params = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        expected = direct.completions.create(**params).choices[0].text
        assert routed.completions.create(**params).choices[0].text == expected
        usage = {"include_usage": True}
        chunks = list(routed.completions.create(**params, stream=True, stream_options=usage))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == 16
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Reverse a list."}]  # fmt: skip
    params = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    expected = direct.chat.completions.create(**params).choices[0].message.content
    assert routed.chat.completions.create(**params).choices[0].message.content == expected
    stream = routed.chat.completions.create(**params, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_cache_aware_keeps_each_prefix_on_one_worker(fleet: Fleet) -> None:
    tenants = [
        f"# tenant {t}\n" + f"def helper_{t}(x):\n    return x * {t}\n" * 4 for t in range(3)
    ]
    homes: dict[int, set[str]] = {t: set() for t in range(3)}
    hits_before = sum(scrape(r.url)["lanner:prefix_cache_hits_total{}"] for r in fleet.replicas)
    for request in range(9):
        tenant = request % 3
        before = served(fleet)
        assert complete(fleet.router.url, tenants[tenant] + f"# q{request}\n").status_code == 200
        after = served(fleet)
        homes[tenant] |= {url for url in after if after[url] > before.get(url, 0)}
    assert all(len(workers) == 1 for workers in homes.values()), homes
    assert len(set().union(*homes.values())) >= 2  # the tenants did not all pile on one
    hits = sum(scrape(r.url)["lanner:prefix_cache_hits_total{}"] for r in fleet.replicas)
    assert hits - hits_before >= 6 * 40  # six repeats, each reusing its tenant's prefix
    decisions = scrape(fleet.router.url)
    assert decisions["lanner:router_decisions_total{reason=prefix_hit}"] >= 6


def test_router_errors_are_openai_shaped(fleet: Fleet) -> None:
    url = fleet.router.url
    # The worker's own validation passes through unchanged.
    bad = complete(url, "x", top_p=2)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    malformed = httpx.post(f"{url}/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"})  # fmt: skip
    assert malformed.status_code == 400 and "error" in malformed.json()
    # The router's own limits and checks.
    huge = httpx.post(f"{url}/v1/completions", content=b" " * 70_000)
    assert huge.status_code == 413
    assert huge.json()["error"]["type"] == "RequestTooLargeError"
    rebound = httpx.get(f"{url}/health", headers={"host": "attacker.example:80"})
    assert rebound.status_code == 400 and "Host" in rebound.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong = httpx.get(f"{url}/v1/completions")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    body = httpx.get(f"{url}/health").json()
    assert body["status"] == "ok" and body["workers_up"] == 3
    assert httpx.get(f"{url}/health").headers["content-type"] == "application/json"
    assert httpx.post(f"{url}/workers", json={"url": "ftp://x"}).status_code == 400
    assert httpx.request("DELETE", f"{url}/workers", params={"url": "http://nowhere:1"}
                         ).status_code == 404  # fmt: skip


def test_client_disconnect_aborts_on_the_worker(fleet: Fleet) -> None:
    body = {"model": MODEL, "prompt": "def long_function():", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{fleet.router.url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())  # one token arrived: it runs on some worker

    # The router closed the worker's stream; the worker aborted and freed the request.
    def idle() -> bool:
        workers = [scrape(r.url) for r in fleet.replicas]
        return all(
            w["lanner:num_requests_running{}"] == 0 and w["lanner:kv_cache_usage_perc{}"] == 0
            for w in workers
        )

    wait_for(idle, timeout_s=10, what="the workers to drop the aborted request")
    aborted = sum(scrape(r.url)["lanner:request_success_total{finished_reason=abort}"]
                  for r in fleet.replicas)  # fmt: skip
    assert aborted >= 1
    wait_for(lambda: all(
        w["outstanding"] == 0 for w in httpx.get(f"{fleet.router.url}/workers").json()["workers"]
    ), what="the router's outstanding count to drop")  # fmt: skip


def test_workers_join_and_leave_at_run_time(fleet: Fleet) -> None:
    url, leaving = fleet.router.url, fleet.replicas[2].url
    removed = httpx.request("DELETE", f"{url}/workers", json={"url": leaving})
    assert removed.status_code == 200 and removed.json()["removed"] == leaving
    assert leaving not in health(fleet.router)
    before = served(fleet)
    for i in range(4):
        assert complete(url, f"# joined {i}\nx = {i}").status_code == 200
    assert served(fleet).get(leaving, 0) == before.get(leaving, 0)
    added = httpx.post(f"{url}/workers", json={"url": leaving + "/"})
    assert added.status_code == 201 and added.json()["worker"]["healthy"] is True
    assert httpx.post(f"{url}/workers", json={"url": leaving}).status_code == 409
    assert health(fleet.router) == {r.url: True for r in fleet.replicas}


def _stream(url: str, prompt: str) -> tuple[int, str, bool, str | None]:
    """(data chunks seen, text, finished cleanly, error) of one streamed completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    chunks, text, done, error = 0, "", False, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            return 0, "", False, f"HTTP {response.status_code}: {response.read()[:200]!r}"
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            chunks += 1
            text += chunk["choices"][0]["text"]
    return chunks, text, done and error is None, error


def test_killed_replica_loses_no_unstarted_request_and_serves_again(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    router, victim = fleet.router, fleet.replicas[1]
    prompts = [f"def task_{i}(items):\n    # step {i}\n" for i in range(12)]
    with ThreadPoolExecutor(len(prompts)) as pool:  # batching never changes greedy outputs
        answers = pool.map(lambda p: complete(fleet.replicas[0].url, p, 40), prompts)
        expected = {
            p: a.json()["choices"][0]["text"] for p, a in zip(prompts, answers, strict=True)
        }
    retries_before = scrape(router.url)["lanner:router_retries_total{}"]

    def on_victim() -> int:
        workers = httpx.get(f"{router.url}/workers").json()["workers"]
        return next(w["outstanding"] for w in workers if w["url"] == victim.url)

    with ThreadPoolExecutor(len(prompts)) as pool:
        whole = [pool.submit(complete, router.url, p, 40) for p in prompts[:6]]
        streams = [pool.submit(_stream, router.url, p) for p in prompts[6:]]
        wait_for(lambda: on_victim() >= 3, what="requests in flight on the victim")
        os.killpg(victim.process.pid, signal.SIGKILL)
        for prompt, future in zip(prompts[:6], whole, strict=True):
            response = future.result()
            # Not streamed: nothing reached the client, so the router retried it.
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected[prompt]
        for prompt, future in zip(prompts[6:], streams, strict=True):
            chunks, text, clean, error = future.result()
            if clean:
                assert text == expected[prompt]
            else:  # only a stream that had already started may break off
                assert chunks >= 1 and error and "mid-stream" in error, (chunks, error)
    assert scrape(router.url)["lanner:router_retries_total{}"] > retries_before
    # The router's /health says who is up; the others keep serving.
    wait_for(lambda: health(router) == {r.url: r is not victim for r in fleet.replicas},
             what="the victim marked down")  # fmt: skip
    before = served(fleet)
    for i in range(4):
        assert complete(router.url, f"# after the kill {i}\n").status_code == 200
    assert served(fleet)[victim.url] == before[victim.url]
    # Restarted on its port, it is checked back in and used again.
    victim.stop()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reborn = ServerProcess(DEFAULT_MODEL_DIR, REPLICA_ARGS, fleet.logs / "reborn.log",
                           port=victim.port)  # fmt: skip
    fleet.replicas[1] = reborn
    reborn.wait_ready()
    wait_for(lambda: all(health(router).values()), what="the restarted replica back in")
    before = served(fleet)
    for i in range(3):  # new prefixes go to the least loaded; its tree is the emptiest
        assert complete(router.url, f"# fresh tenant {i}\ny = {i}").status_code == 200
    assert served(fleet)[victim.url] > before[victim.url]
