"""Fuzzing `lanner serve`: schemathesis on /openapi.json, and hypothesis-drawn bodies for
completions and chat. No case may get a 5xx or a non-OpenAI error body, and /health
answers in under 100 ms for the whole run. Examples are bounded and derandomized, so CI
runs the same cases each time."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.entrypoints.server_utils import ServerProcess, running
from tests.entrypoints.test_server_hardening import HealthWatch

MODEL = "tiny"
FUZZ_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    # A short context and small limits keep every valid request cheap to run.
    server = ServerProcess(
        tiny_model_dirs["llama"],
        ["--served-model-name", MODEL, "--max-model-len", "48", "--max-n", "3",
         "--max-logprobs", "3", "--num-gpu-blocks-override", "512", "--max-num-seqs", "16",
         "--trust-request-chat-template", "--prepare-timeout", "2"],
        tmp_path_factory.mktemp("fuzz_logs") / "fuzz.log",
    )  # fmt: skip
    with running({"fuzz": server}):
        yield server


@pytest.fixture(scope="module")
def health_watch(fuzz_server: ServerProcess) -> Iterator[HealthWatch]:
    """One poller over every fuzz test; test_health_stayed_fast (last) reads it."""
    watch = HealthWatch(fuzz_server)
    with watch:
        yield watch


# (test, status) -> count: the fuzzers must reach the engine (200s), not only the checks.
SEEN: Counter[tuple[str, int]] = Counter()


def check_response(response: httpx.Response | object, test: str) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    SEEN[test, status] += 1
    assert status < 500, text[:500]
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
        assert len(text) < 2000 and ".py" not in error["message"]


def test_schema_cases_get_no_5xx(fuzz_server: ServerProcess, health_watch: HealthWatch) -> None:
    """schemathesis draws cases (valid and invalid) for every operation /openapi.json
    declares. Its pytest plugin needs the schema at collection time, before the server
    exists, so the operations are walked here."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/health"),
    }
    for operation in operations:

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            check_response(case.call(base_url=fuzz_server.url, timeout=30), case.path)

        run()


# -- hypothesis-drawn bodies ------------------------------------------------------------

# Anything JSON can carry, surrogates, huge integers and NaN included.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 4, max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "min_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", "ignore_eos", "priority", "stream", "stream_options",
    "model", "user", "request_id", "best_of", "echo", "suffix", "prompt_logprobs",
)  # fmt: skip
# Fields take values of their own type near their edges, or anything at all.
field_values = (
    st.integers(min_value=-3, max_value=70)
    | st.floats(min_value=-3, max_value=3)
    | st.sampled_from([MODEL, "", "x" * 300, "\ud800", 2**64, -(2**70), [2**64], [], {}])
    | json_values
)
prompts = (
    st.text(max_size=40)
    | st.lists(st.integers(min_value=-2, max_value=500), max_size=40)
    | st.lists(st.text(max_size=10), max_size=3)
    | json_values
)
# Bodies a client could mean: every field in range (the engine runs them).
plausible = {
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 383), max_size=3),
    "min_tokens": st.integers(0, 6),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logprobs": st.integers(0, 3),
    "ignore_eos": st.booleans(),
    "priority": st.integers(-5, 5),
    "stream": st.booleans(),
    "model": st.just(MODEL),
}
plausible_completions = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=30)
        | st.lists(st.integers(1, 383), min_size=1, max_size=20),
        "max_tokens": st.integers(1, 6),
    },
    optional=plausible,
)
completion_bodies = plausible_completions | st.fixed_dictionaries(
    {"prompt": prompts, "max_tokens": st.integers(min_value=-1, max_value=6) | field_values},
    optional={name: field_values for name in SAMPLING_FIELDS},
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values, "name": json_values},
    ),
    max_size=3,
)
plausible_chats = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}
            ),
            min_size=1,
            max_size=3,
        ),
        "max_tokens": st.integers(1, 6),
    },
    optional={**{k: v for k, v in plausible.items() if k != "logprobs"}, "logprobs": st.booleans()},
)
chat_bodies = plausible_chats | st.fixed_dictionaries(
    {"messages": messages | json_values, "max_tokens": st.integers(min_value=-1, max_value=6)},
    optional={
        **{name: field_values for name in SAMPLING_FIELDS},
        "logprobs": st.booleans() | json_values,
        "top_logprobs": field_values,
        "max_completion_tokens": field_values,
        "chat_template": st.sampled_from(["{{ messages[0]['content'] }}", "{% for %}"])
        | json_values,
        "add_generation_prompt": json_values,
        "tools": json_values,
        "response_format": json_values,
    },
)


def _post(server: ServerProcess, path: str, body: object) -> httpx.Response:
    content = json.dumps(body, allow_nan=True)  # NaN/Infinity literals on purpose
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


@FUZZ_SETTINGS
@given(body=completion_bodies | json_values)
def test_fuzzed_completion_bodies(fuzz_server: ServerProcess, body: object) -> None:
    check_response(_post(fuzz_server, "/v1/completions", body), "completion bodies")


@FUZZ_SETTINGS
@given(body=chat_bodies | json_values)
def test_fuzzed_chat_bodies(fuzz_server: ServerProcess, body: object) -> None:
    check_response(_post(fuzz_server, "/v1/chat/completions", body), "chat bodies")


def test_health_stayed_fast(fuzz_server: ServerProcess, health_watch: HealthWatch) -> None:
    """Runs last in this module: the poller covered every case above."""
    for test in ("/v1/completions", "/v1/chat/completions", "completion bodies", "chat bodies"):
        assert SEEN[test, 200] and SEEN[test, 400], {k: v for k, v in SEEN.items() if k[0] == test}
    health_watch.check()
    # Nothing is left running or holding KV cache.
    metrics = httpx.get(f"{fuzz_server.url}/metrics").text
    assert 'lanner:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
