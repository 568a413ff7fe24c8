"""OpenAI and vLLM API parity (issue 21), against a real server on the embedded demo model:
logit_bias and friends, echo, chat streaming's role chunk, prompt logprobs, stream options,
tools with tool_choice none, chat echo, prompt truncation, token ids, and
lm-evaluation-harness scoring through the server as it scores offline."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lanner import LLM, SamplingParams
from lanner.engine.config import DEFAULT_MODEL_DIR
from tests.entrypoints.server_utils import ServerProcess, running

MODEL = "lanner-demo"
MAX_MODEL_LEN = 256
VOCAB_SIZE = 8192


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        DEFAULT_MODEL_DIR,
        ["--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "512"],
        tmp_path_factory.mktemp("parity_logs") / "parity.log",
    )
    with running({"parity": process}):
        yield process


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(dtype="float32", device="cpu", block_size=4, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def completion(server: ServerProcess, **body: object) -> dict:
    response = post(server, "/v1/completions", {"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_lines(server: ServerProcess, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# -- 1. logit_bias, allowed_token_ids, bad_words ------------------------------------------


def test_logit_bias_is_applied(server: ServerProcess, offline: LLM) -> None:
    base = {"prompt": "def add(a, b):", "max_tokens": 6, "return_token_ids": True}
    plain = completion(server, **base)["choices"][0]["token_ids"]
    biased = completion(server, **base, logit_bias={"42": 100})["choices"][0]["token_ids"]
    assert biased == [42] * 6 != plain
    # A bias against the greedy choice moves it elsewhere, batch neighbours untouched.
    against = completion(server, **base, logit_bias={str(plain[0]): -100})["choices"][0]
    assert against["token_ids"][0] != plain[0]
    offline_ids = (
        offline.generate(
            "def add(a, b):", SamplingParams(temperature=0, max_tokens=6, logit_bias={42: 100})
        )[0]
        .outputs[0]
        .token_ids
    )
    assert offline_ids == biased
    chat = post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
         "temperature": 0, "logit_bias": {"42": 100}, "return_token_ids": True},
    ).json()  # fmt: skip
    assert chat["choices"][0]["token_ids"] == [42] * 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_vocabulary_ids_are_400s(server: ServerProcess, path: str) -> None:
    messages = [{"role": "user", "content": "x"}]
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": messages}
    for field, value in (
        ("logit_bias", {"8193": 1}),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"5": 500}),
        ("allowed_token_ids", [VOCAB_SIZE]),
    ):
        response = post(server, path, {**body, field: value})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field, error
    message = post(server, path, {**body, "logit_bias": {"8193": 1}}).json()["error"]["message"]
    assert "8193" in message and "8192" in message


def test_allowed_token_ids_and_bad_words(server: ServerProcess, offline: LLM) -> None:
    base = {"prompt": "import os\n", "max_tokens": 8, "return_token_ids": True}
    allowed = [11, 12, 13]
    ids = completion(server, **base, allowed_token_ids=allowed)["choices"][0]["token_ids"]
    assert set(ids) <= set(allowed)
    text = completion(server, **base)["choices"][0]["text"]
    word = next(w for w in text.split() if len(w) > 2)
    banned = completion(server, **base, bad_words=[word])["choices"][0]["text"]
    assert word not in banned.split() and banned != text
    expected = (
        offline.generate(
            "import os\n", SamplingParams(temperature=0, max_tokens=8, bad_words=[word])
        )[0]
        .outputs[0]
        .text
    )
    assert banned == expected


# -- 2. echo ---------------------------------------------------------------------------


def test_echo_returns_prompt_then_completion(server: ServerProcess) -> None:
    prompt = "def fibonacci(n):"
    plain = completion(server, prompt=prompt, max_tokens=5)["choices"][0]["text"]
    echoed = completion(server, prompt=prompt, max_tokens=5, echo=True)["choices"][0]["text"]
    assert echoed == prompt + plain
    streamed = stream_lines(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True,
         "stream": True},
    )  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in streamed) == prompt + plain


def test_echo_with_max_tokens_0_scores_the_prompt(server: ServerProcess, offline: LLM) -> None:
    ids = offline.get_tokenizer().encode("import sys\nprint(sys.argv)")
    body = completion(server, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = offline.generate(
        {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1)
    )[0].prompt_logprobs
    for got, want, token in zip(logprobs["token_logprobs"][1:], expected[1:], ids[1:], strict=True):
        assert got == pytest.approx(want[token].logprob, abs=1e-5)
    assert choice["text"] == offline.get_tokenizer().decode(ids)
    # Without echo, max_tokens 0 is still a 400.
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 0}).status_code == 400


# -- 3. chat streaming: the role comes with the first content ------------------------------


def test_chat_stream_role_comes_with_first_token(server: ServerProcess) -> None:
    chunks = stream_lines(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
         "temperature": 0, "stream": True, "return_token_ids": True, "n": 2},
    )  # fmt: skip
    firsts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            firsts.setdefault(choice["index"], choice)
            if choice is not firsts[choice["index"]]:
                assert "role" not in choice["delta"]
    assert set(firsts) == {0, 1}
    for first in firsts.values():
        assert first["delta"]["role"] == "assistant" and "content" in first["delta"]
        assert first["token_ids"], "the first chunk is sent once a token exists"


# -- 4. chat prompt_logprobs ------------------------------------------------------------


def test_chat_prompt_logprobs(server: ServerProcess) -> None:
    body = post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
         "prompt_logprobs": 1, "return_token_ids": True},
    ).json()  # fmt: skip
    positions = body["prompt_logprobs"]
    assert positions[0] is None and len(positions) == len(body["prompt_token_ids"])
    for position, token in zip(positions[1:], body["prompt_token_ids"][1:], strict=True):
        assert str(token) in position


# -- 5. stream options --------------------------------------------------------------------


def test_stream_options_need_stream_and_continuous_usage(server: ServerProcess) -> None:
    response = post(
        server, "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"
    chunks = stream_lines(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "def f():", "max_tokens": 5, "temperature": 0,
         "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )  # fmt: skip
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c.get("usage") for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 5


# -- 6. tools with tool_choice none ---------------------------------------------------------


def test_tools_with_tool_choice_none_answer_plainly(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "what time is it?"}],
        tools=tools,
        tool_choice="none",
        max_tokens=4,
    )
    assert reply.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="started with --enable-auto-tool-choice"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=tools, max_tokens=2
        )


# -- 7. chat echo, truncation, token ids, suffix ---------------------------------------------


def test_chat_echo_truncation_token_ids_and_suffix(server: ServerProcess) -> None:
    start = "def greet(name):\n    return"
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "write greet"},
            {"role": "assistant", "content": start},
        ],
        "add_generation_prompt": False,
        "max_tokens": 4,
        "temperature": 0,
    }  # fmt: skip
    plain = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(server, "/v1/chat/completions", {**body, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == start + plain
    truncated = completion(
        server, prompt="one two three four five six seven", max_tokens=2,
        truncate_prompt_tokens=3, return_token_ids=True,
    )  # fmt: skip
    assert truncated["usage"]["prompt_tokens"] == 3
    choice = truncated["choices"][0]
    assert len(choice["prompt_token_ids"]) == 3 and len(choice["token_ids"]) == 2
    suffix = post(server, "/v1/completions", {"prompt": "def f(", "suffix": "):"})
    assert suffix.status_code == 400 and "fill-in-the-middle" in suffix.json()["error"]["message"]


# -- no silent fields ---------------------------------------------------------------------------


def test_every_request_field_is_read_somewhere() -> None:
    """Each field of the request models must be read by the code that prepares or answers
    requests (or the model's own methods): a field nobody reads is accepted and silently
    ignored, the class of bug behind logit_bias, prompt_logprobs and stream_options."""
    from lanner.entrypoints.openai import prepare, protocol, responses, serving

    read: set[str] = set()
    for module in (prepare, serving, responses, protocol):
        tree = ast.parse(Path(module.__file__).read_text())
        read |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    unread = {}
    for model in (
        protocol.CompletionRequest,
        protocol.ChatCompletionRequest,
        protocol.ChatMessage,
        protocol.StreamOptions,
    ):
        missing = sorted(set(model.model_fields) - read)
        if missing:
            unread[model.__name__] = missing
    assert not unread


# -- lm-evaluation-harness through the server ---------------------------------------------

PAIRS = [
    ("def add(a, b):\n    return", " a + b"),
    ("import os\nprint(os.", "getcwd())"),
    ("for i in range(10):\n    ", "print(i)"),
    ("class Stack:\n    def __init__(self):\n        self.", "items = []"),
    ("with open(path) as f:\n    data = f.", "read()"),
    ("if __name__ == ", '"__main__":'),
    ("try:\n    x = int(s)\nexcept ", "ValueError:"),
    ("def is_even(n):\n    return n % 2 ==", " 0"),
    ("numbers = [1, 2, 3]\ntotal = sum(", "numbers)"),
    ("import json\ndata = json.", "loads(text)"),
    ('def __repr__(self):\n    return f"', '{self.name}"'),
    ("while True:\n    line = input()\n    if not line:\n        ", "break"),
    ("from pathlib import ", "Path"),
    ("x = [i * i for i in ", "range(5)]"),
    ("def main():\n    args = parse_args()\n    ", "run(args)"),
    ("raise ValueError(", '"bad value")'),
    ("assert isinstance(x, ", "int)"),
    ("logger = logging.getLogger(", "__name__)"),
    ("result = {k: v for k, v in ", "pairs}"),
    ("async def fetch(url):\n    async with ", "session.get(url) as r:"),
    ("return sorted(items, key=", "len)"),
    ("self.assertEqual(", "a, b)"),
    ("parser.add_argument(", '"--verbose")'),
    ("os.path.join(", "root, name)"),
]


def test_lm_eval_loglikelihoods_match_offline(
    server: ServerProcess, offline: LLM, tmp_path: Path
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "python_pairs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in PAIRS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lanner_python.yaml").write_text(
        "task: lanner_python\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={DEFAULT_MODEL_DIR},"
            f"tokenizer_backend=huggingface,num_concurrent=4,max_retries=1"
        ),
        tasks=["lanner_python"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    samples = results["samples"]["lanner_python"]
    assert len(samples) == len(PAIRS)
    tokenizer = offline.get_tokenizer()
    for sample in samples:
        context, continuation = sample["arguments"][0]
        # lm-eval moves a context's trailing whitespace onto the continuation.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        # lm-eval's ids: the context alone, then what the whole adds past that length.
        whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        ids = context_ids + whole[len(context_ids) :]
        scored = offline.generate(
            {"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1)
        )[0]
        expected = sum(
            scored.prompt_logprobs[i][ids[i]].logprob for i in range(len(context_ids), len(ids))
        )
        loglikelihood, _ = sample["resps"][0][0]
        assert loglikelihood == pytest.approx(expected, abs=1e-4)
