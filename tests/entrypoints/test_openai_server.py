"""`lanner serve` end to end: a real server subprocess on a tiny model, driven with the
official openai client and raw HTTP. Outputs match the offline LLM; errors are
OpenAI-shaped; load, disconnects and a dead engine core never leak KV or hang."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lanner import LLM, SamplingParams
from tests.entrypoints.server_utils import ServerProcess, running

MODEL = "tiny"
MAX_MODEL_LEN = 512  # the tiny models' max_position_embeddings
_CORPUS = "the quick brown fox jumps over lazy dog hello world import os sys def return"
WORDS = _CORPUS.split()


@pytest.fixture(scope="module")
def servers(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """Both servers start at once (each takes a few seconds to load)."""
    logs = tmp_path_factory.mktemp("server_logs")
    model_dir = tiny_model_dirs["llama"]
    started = {
        "main": ServerProcess(
            model_dir,
            [
                "--served-model-name",
                MODEL,
                "--max-model-len",
                str(MAX_MODEL_LEN),
                "--num-gpu-blocks-override",
                "1024",
                "--max-num-batched-tokens",
                "2048",
            ],
            logs / "main.log",
        ),  # fmt: skip
        # One sequence at a time and one waiting: the third concurrent request gets 429.
        "guarded": ServerProcess(
            model_dir,
            [
                "--served-model-name",
                MODEL,
                "--max-model-len",
                str(MAX_MODEL_LEN),
                "--num-gpu-blocks-override",
                "300",
                "--api-key",
                "sekret",
                "--max-num-seqs",
                "1",
                "--max-queued-requests",
                "1",
            ],
            logs / "guarded.log",
        ),  # fmt: skip
    }
    with running(started):
        yield started


@pytest.fixture(scope="module")
def server(servers: dict[str, ServerProcess]) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_model_dirs: dict[str, Path]) -> LLM:
    return LLM(
        str(tiny_model_dirs["llama"]),
        dtype="float32",
        device="cpu",
        block_size=4,
        max_model_len=MAX_MODEL_LEN,
    )


def prompt_text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(2 + i % 5))


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client, as 'name{labels}' -> value."""
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name"
            )
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def wait_idle(server: ServerProcess, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(server)
        idle = (
            metrics["lanner:num_requests_running{}"] == 0
            and metrics["lanner:num_requests_waiting{}"] == 0
            and metrics["lanner:kv_cache_usage_perc{}"] == 0
        )
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def test_models_health_version(server: ServerProcess, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_completion_matches_offline_llm(client: openai.OpenAI, offline: LLM) -> None:
    prompt = "def fibonacci(n):"
    expected = offline.generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]
    result = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].text == expected.outputs[0].text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == 12
    streamed = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_streamed_equals_unstreamed(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    params = dict(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    whole = client.chat.completions.create(**params, extra_body={"ignore_eos": True})
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert whole.choices[0].message.content == expected[0].outputs[0].text
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(**params, stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **params,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    texts = ["", ""]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [whole.choices[0].message.content] * 2  # greedy: both samples agree
    roles = [c.choices[0].delta.role for c in chunks[:-1] if c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_n_samples_logprobs_and_seed(client: openai.OpenAI) -> None:
    params = dict(model=MODEL, prompt="hello world", max_tokens=6, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**params, logprobs=2, extra_body={"ignore_eos": True})
    again = client.completions.create(**params, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # each sample draws its own tokens
    for choice in first.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
        assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    other = client.completions.create(**{**params, "seed": 8}, extra_body={"ignore_eos": True})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert len(chat.choices) == 2
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the sampled token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_several_prompts_in_one_completion(client: openai.OpenAI) -> None:
    prompts = ["hello world", "import os"]
    params = dict(model=MODEL, max_tokens=5, temperature=0, n=2, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **params).choices[0].text for p in prompts]
    together = client.completions.create(prompt=prompts, **params)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    assert [c.text for c in together.choices] == [alone[0], alone[0], alone[1], alone[1]]
    texts = [""] * 4
    for chunk in client.completions.create(prompt=prompts, stream=True, **params):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in together.choices]


def test_prompt_logprobs(server: ServerProcess, offline: LLM) -> None:
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    expected = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    body = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    got = choice["prompt_logprobs"]
    assert got[0] is None and len(got) == 4
    for position, want in zip(got[1:], expected.prompt_logprobs[1:], strict=True):
        assert {int(t): v["logprob"] for t, v in position.items()} == pytest.approx(
            {t: lp.logprob for t, lp in want.items()}
        )


def test_stop_strings(client: openai.OpenAI) -> None:
    base = dict(model=MODEL, prompt="import os", max_tokens=20, temperature=0)
    text = client.completions.create(**base, extra_body={"ignore_eos": True}).choices[0].text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    cut = client.completions.create(**base, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        **base, stop=stop, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_200_concurrent_streams_match_offline(server: ServerProcess, offline: LLM) -> None:
    prompts = [prompt_text(i) for i in range(200)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    before = scrape(server)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run_all() -> list[str]:
        limits = httpx.Limits(max_connections=250)
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.AsyncClient(limits=limits, timeout=60),
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run_all()) == expected
    after = wait_idle(server)
    assert after["lanner:kv_cache_usage_perc{}"] == 0
    assert after["lanner:num_requests_running{}"] == 0
    # Only the prefix cache holds blocks now, and it can let go of every one of them.
    assert httpx.post(f"{server.url}/reset_prefix_cache").json() == {"emptied": True}
    finished = "lanner:request_success_total{finished_reason=length}"
    assert after[finished] - before[finished] == 200
    assert (
        after["lanner:generation_tokens_total{}"] - before["lanner:generation_tokens_total{}"]
        == 200 * 8
    )


def test_metrics_count_what_was_sent(server: ServerProcess, client: openai.OpenAI) -> None:
    before = scrape(server)
    usage = [
        client.completions.create(
            model=MODEL, prompt=prompt_text(i), max_tokens=3 + i, temperature=0,
            extra_body={"ignore_eos": True},
        ).usage
        for i in range(3)
    ]  # fmt: skip
    after = wait_idle(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("lanner:prompt_tokens_total{}") == sum(u.prompt_tokens for u in usage)
    assert delta("lanner:generation_tokens_total{}") == sum(u.completion_tokens for u in usage)
    assert delta("lanner:request_success_total{finished_reason=length}") == 3
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"lanner:{name}_seconds_count{{}}") == 3
    assert delta("lanner:time_per_output_token_seconds_count{}") == 3
    assert "lanner:prefix_cache_hit_rate{}" in after


def test_client_disconnect_aborts_and_frees(server: ServerProcess) -> None:
    before = scrape(server)
    body = {
        "model": MODEL,
        "prompt": "hello",
        "max_tokens": MAX_MODEL_LEN - 10,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    metrics = wait_idle(server)
    assert metrics["lanner:num_requests_running{}"] == 0
    assert metrics["lanner:kv_cache_usage_perc{}"] == 0
    aborted = "lanner:request_success_total{finished_reason=abort}"
    assert metrics[aborted] - before[aborted] == 1


def test_unstreamed_client_that_gives_up_aborts(server: ServerProcess) -> None:
    before = scrape(server)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 480, "ignore_eos": True, "n": 8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    metrics = wait_idle(server)
    aborted = "lanner:request_success_total{finished_reason=abort}"
    assert metrics[aborted] - before[aborted] == 1
    generated = "lanner:generation_tokens_total{}"
    assert metrics[generated] - before[generated] < 8 * 480
    assert metrics["lanner:kv_cache_usage_perc{}"] == 0


def _post(server: ServerProcess, path: str, body: object, **kwargs) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/v1/completions", '{"prompt": "hi", ', 400, None, "malformed JSON"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "[1, 128]"),
        ("/v1/completions", {"prompt": "hi", "top_k": "x"}, 400, "top_k", "integer"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "20"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
        (
            "/v1/completions",
            {"prompt": "hi", "max_tokens": 10_000},
            400,
            "max_tokens",
            f"maximum context length is {MAX_MODEL_LEN}",
        ),
        (
            "/v1/completions",
            {"prompt": list(range(1, 600))},
            400,
            "prompt",
            f"max_model_len is {MAX_MODEL_LEN}",
        ),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            400,
            "top_logprobs",
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9999},
            400,
            "max_completion_tokens",
            f"maximum context length is {MAX_MODEL_LEN}",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    server: ServerProcess, path: str, body: object, status: int, param: str | None, words: str
) -> None:
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_api_key_and_queue_limit(servers: dict[str, ServerProcess]) -> None:
    guarded = servers["guarded"]
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # open to probes
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for path in ("/v1/models", "/metrics", "/version"):
            response = httpx.get(f"{guarded.url}{path}", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"Authorization": "Bearer sekret"}
    long = {"model": MODEL, "prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def crowd() -> list[int]:
        async with httpx.AsyncClient(base_url=guarded.url, headers=auth, timeout=30) as http:
            # one runs, one waits; then the queue is full
            first = await http.send(http.build_request("POST", "/v1/completions", json=long),
                                    stream=True)  # fmt: skip
            second = await http.send(http.build_request("POST", "/v1/completions", json=long),
                                     stream=True)  # fmt: skip
            third = await http.post("/v1/completions", json={**long, "stream": False})
            assert third.json()["error"]["type"] == "RateLimitError"
            await first.aclose()
            await second.aclose()
            return [first.status_code, second.status_code, third.status_code]

    assert asyncio.run(crowd()) == [200, 200, 429]


def test_dead_engine_core_fails_requests_and_health(servers: dict[str, ServerProcess]) -> None:
    guarded = servers["guarded"]
    auth = {"Authorization": "Bearer sekret"}

    def load() -> tuple[float, float]:
        metrics = httpx.get(f"{guarded.url}/metrics", headers=auth).text
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
        }
        return samples["lanner:num_requests_running"], samples["lanner:num_requests_waiting"]

    deadline = time.monotonic() + 10
    while load() != (0, 0):  # the requests the last test dropped are aborted by now
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # One request runs (max-num-seqs 1) and one waits: both are in flight at the kill.
    # The waiting one is sent once the streamed one has produced a token, so it arrives
    # while the first still has ~500 tokens to go (sent together, the first could finish
    # before the second reached the server).
    # Its client is built (and connected) up front: building one costs tens of ms of CPU,
    # enough on a loaded machine for the first request to finish before the second.
    body = {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True}
    second = httpx.Client(base_url=guarded.url, headers=auth, timeout=30)
    assert second.get("/health").status_code == 200
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{guarded.url}/v1/completions",
        json={**body, "stream": True},
        headers=auth,
        timeout=30,
    ) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data:"))
        events = [next(lines)]
        with ThreadPoolExecutor(1) as pool:
            unstreamed = pool.submit(second.post, "/v1/completions", json=body)
            seen = []  # (running, waiting) polls, to say what happened if it times out
            while (now := load()) != (1, 1):
                seen.append(now)
                assert time.monotonic() - started < 20, (
                    f"never saw one running and one waiting: first polls {seen[:3]}, "
                    f"last {seen[-3:]}, unstreamed "
                    f"{unstreamed.done() and unstreamed.result().text[:300]!r}"
                )
                time.sleep(0.02)
            os.kill(guarded.core_pid(), signal.SIGKILL)
            events += list(lines)
            failed = unstreamed.result()
    second.close()
    assert failed.status_code == 500, failed.text
    assert "engine core" in failed.json()["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert "engine core" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    assert time.monotonic() - started < 25
    assert httpx.get(f"{guarded.url}/health").status_code == 503
    response = httpx.post(f"{guarded.url}/v1/completions", headers=auth, json={"prompt": "x"})
    assert response.status_code == 503 and "engine core" in response.json()["error"]["message"]


def test_sigterm_drains_in_flight_requests(server: ServerProcess) -> None:
    # Runs last against this server: it shuts it down.
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    core_pid = server.core_pid()
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        server.process.send_signal(signal.SIGTERM)
        chunks = [line for line in lines if line.startswith("data:")]
    assert chunks[-1] == "data: [DONE]"
    texts = [json.loads(c.removeprefix("data: "))["choices"] for c in chunks[:-1]]
    assert texts[-1][0]["finish_reason"] == "length"
    # uvicorn ends by re-raising the signal it caught, after the drain and shutdown
    assert server.process.wait(15) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
    assert not Path(f"/proc/{core_pid}").exists()  # shut down and reaped
