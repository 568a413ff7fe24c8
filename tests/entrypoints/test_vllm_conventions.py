"""What a vLLM user expects of `lanner serve`: the model's generation_config.json sampling
defaults for fields a request leaves out, /tokenize and /detokenize (prepared in the
request workers, bounded like every other endpoint), and prefix-cache query/hit counters
with vLLM's names on request."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lanner import LLM, SamplingParams
from lanner.engine.core import EngineCoreStats
from lanner.model.tokenizer import load_tokenizer, render_chat_template
from tests.entrypoints.server_utils import ServerProcess, running

MODEL = "tiny"
# Greedy and 3 tokens unless a request says otherwise: easy to tell from the API's defaults.
GENERATION_CONFIG = {"temperature": 0.0, "top_k": 20, "max_new_tokens": 3, "do_sample": True}
MAX_PROMPT_CHARS = 200


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("with_generation_config") / "llama"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("conventions_log") / "server.log"
    process = ServerProcess(
        model_dir,
        ["--served-model-name", MODEL, "--max-model-len", "128", "--num-gpu-blocks-override",
         "256", "--max-prompt-chars", str(MAX_PROMPT_CHARS)],
        log,
    )  # fmt: skip
    with running({"server": process}):
        yield process


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_generation_config_defaults_offline(model_dir: Path) -> None:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.0, 20, 3)
    prompt = {"prompt_token_ids": [5, 9, 2, 7]}
    [out] = llm.generate(prompt)  # no SamplingParams: the model's defaults
    greedy = SamplingParams(temperature=0, max_tokens=3)
    assert out.outputs[0].token_ids == llm.generate(prompt, greedy)[0].outputs[0].token_ids
    # Explicit SamplingParams are taken as given (vLLM's offline behaviour).
    assert len(llm.generate(prompt, SamplingParams(max_tokens=6))[0].outputs[0].token_ids) == 6
    plain = LLM(str(model_dir), dtype="float32", device="cpu", block_size=4, max_model_len=128,
                generation_config="vllm")  # fmt: skip
    assert plain.get_default_sampling_params() == SamplingParams()


def test_a_bad_generation_config_fails_at_start(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generation_config.json").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(ValueError, match="temperature"):
        LLM(str(model_dir), device="cpu", max_model_len=64, num_gpu_blocks_override=32,
            generation_config=str(bad))  # fmt: skip


def test_generation_config_defaults_served(server: ServerProcess) -> None:
    prompt = {"model": MODEL, "prompt": "hello world", "ignore_eos": True}
    first = post(server, "/v1/completions", prompt).json()
    again = post(server, "/v1/completions", prompt).json()
    assert first["usage"]["completion_tokens"] == 3  # max_new_tokens, not OpenAI's 16
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # temperature 0
    longer = post(server, "/v1/completions", {**prompt, "max_tokens": 5}).json()
    assert longer["usage"]["completion_tokens"] == 5
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}]}).json()  # fmt: skip
    assert chat["usage"]["completion_tokens"] == 3


def test_tokenize_and_detokenize(server: ServerProcess, model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    text = "def fibonacci(n): return n"
    reply = post(server, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    messages = [{"role": "user", "content": "hello there"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    rendered = render_chat_template(tokenizer, messages, True, None)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert chat["token_strs"] is None
    back = post(server, "/detokenize", {"model": MODEL, "tokens": body["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(body["tokens"])}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "model": "other"}, 404, "model"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1] * 129}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_tokenize_endpoints_refuse_bad_input(
    server: ServerProcess, path: str, body: dict, status: int, param: str
) -> None:
    reply = post(server, path, body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_prefix_cache_counters(server: ServerProcess) -> None:
    prompt = {"model": MODEL, "prompt": "the quick brown fox jumps over the lazy dog " * 3,
              "max_tokens": 1}  # fmt: skip
    for _ in range(3):
        assert post(server, "/v1/completions", prompt).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lanner:prefix_cache_")
    }
    assert values["lanner:prefix_cache_queries_total"] >= values["lanner:prefix_cache_hits_total"]
    assert values["lanner:prefix_cache_hits_total"] > 0


def test_vllm_metric_names_on_request() -> None:
    from lanner.metrics.prometheus import ServerMetrics

    metrics = ServerMetrics("lanner:odd-model-name", prefix="vllm")
    metrics.on_core_stats(
        EngineCoreStats(prefix_cache_queried_tokens=40, prefix_cache_hit_tokens=16)
    )
    metrics.on_core_stats(
        EngineCoreStats(prefix_cache_queried_tokens=50, prefix_cache_hit_tokens=16)
    )
    text = metrics.render().decode()
    assert "lanner:" not in text.replace('model_name="lanner:odd-model-name"', "")
    assert 'vllm:prefix_cache_queries_total{model_name="lanner:odd-model-name"} 50.0' in text
    assert 'vllm:prefix_cache_hits_total{model_name="lanner:odd-model-name"} 16.0' in text
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    with pytest.raises(ValueError, match="prefix"):
        ServerMetrics("m", prefix="prom")


GREEDY_4 = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
PROMPT_IDS = list(range(5, 45))  # 40 tokens: two full 16-token blocks for the prefix cache


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return LLM(str(model_dir), max_model_len=128, num_gpu_blocks_override=64, block_size=16)


def test_llm_get_metrics(offline: LLM) -> None:
    """LLM.get_metrics(): vLLM's shapes, values that follow the requests run, vLLM's names
    on request and a ValueError for an unknown prefix."""
    for _ in range(2):  # the second run of the same prompt hits the prefix cache
        offline.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY_4, use_tqdm=False)
    metrics = {(m.name, m.labels.get("finished_reason")): m for m in offline.get_metrics()}
    assert metrics[("lanner:prompt_tokens", None)].value >= 2 * len(PROMPT_IDS)
    assert metrics[("lanner:generation_tokens", None)].value >= 2 * 4
    assert metrics[("lanner:request_success", "length")].value >= 2
    assert metrics[("lanner:num_requests_running", None)].value == 0
    hits = metrics[("lanner:prefix_cache_hits", None)].value
    assert 32 <= hits <= metrics[("lanner:prefix_cache_queries", None)].value
    ttft = metrics[("lanner:time_to_first_token_seconds", None)]
    assert ttft.count >= 2 and ttft.buckets[float("inf")] == ttft.count and ttft.sum > 0
    assert all(m.name.startswith("vllm:") for m in offline.get_metrics(prefix="vllm"))
    with pytest.raises(ValueError, match="prefix"):
        offline.get_metrics(prefix="sglang")


def test_skip_tokenizer_init(model_dir: Path, offline: LLM) -> None:
    """skip_tokenizer_init=True: no tokenizer loaded, token-id prompts give the same tokens
    as with one (and no text); a text prompt fails saying what to pass instead."""
    bare = LLM(str(model_dir), max_model_len=128, num_gpu_blocks_override=64,
               skip_tokenizer_init=True)  # fmt: skip
    assert bare.get_tokenizer() is None
    ours = bare.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY_4, use_tqdm=False)[0]
    theirs = offline.generate({"prompt_token_ids": PROMPT_IDS}, GREEDY_4, use_tqdm=False)[0]
    assert list(ours.outputs[0].token_ids) == list(theirs.outputs[0].token_ids)
    assert not ours.outputs[0].text
    with pytest.raises(ValueError, match="prompt_token_ids"):
        bare.generate("def f():", GREEDY_4, use_tqdm=False)
