"""Structured outputs and tool calls through `lanner serve` on the demo model, with the
official openai client: response_format (json_object, json_schema, a pydantic model via
chat.completions.parse), vLLM's structured_outputs and guided_* fields, 400s for invalid
constraints, and tool calls for tool_choice required, named and auto, streamed and not."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from lanner.engine.config import DEFAULT_MODEL_DIR
from tests.entrypoints.server_utils import ServerProcess, running

MODEL = "lanner-demo"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "now",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}},
            "required": ["zone"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        DEFAULT_MODEL_DIR,
        ["--max-model-len", "512", "--num-gpu-blocks-override", "512",
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        tmp_path_factory.mktemp("structured_logs") / "server.log",
    )  # fmt: skip
    with running({"structured": process}):
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


def test_response_format_json_schema_and_object(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    anything = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=MESSAGES,
        max_tokens=120,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "A person?"}], max_tokens=80,
        response_format=Person, temperature=0.7, seed=3,
    )  # fmt: skip
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and 0 <= parsed.age <= 120


def test_vllm_fields_constrain_completions_and_chat(client: openai.OpenAI) -> None:
    cases = [
        ({"structured_outputs": {"regex": r"[0-9]{2}:[0-9]{2}"}}, r"[0-9]{2}:[0-9]{2}"),
        ({"guided_regex": r"(red|blue) (car|boat)"}, r"(red|blue) (car|boat)"),
        ({"guided_choice": ["alpha", "beta"]}, r"alpha|beta"),
        ({"guided_grammar": 'root ::= "n = " [0-9]+'}, r"n = [0-9]+"),
    ]
    for extra, pattern in cases:
        text = (
            client.completions.create(
                model=MODEL, temperature=0, prompt="x = ", max_tokens=20, extra_body=extra
            )
            .choices[0]
            .text
        )
        assert re.fullmatch(pattern, text), (extra, text)
        chat = (
            client.chat.completions.create(
                model=MODEL, temperature=0, messages=MESSAGES, max_tokens=20, extra_body=extra
            )
            .choices[0]
            .message.content
        )
        assert re.fullmatch(pattern, chat), (extra, chat)
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    text = (
        client.completions.create(
            model=MODEL,
            temperature=0,
            prompt="v = ",
            max_tokens=40,
            extra_body={"guided_json": schema},
        )
        .choices[0]
        .text
    )
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"guided_json": '{"type": '}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "no-such"}}, "guided_json", "invalid"),
        ({"guided_regex": "(open"}, "guided_regex", "invalid"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "invalid"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one output constraint"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ],
)
def test_invalid_constraints_are_400s(
    server: ServerProcess, extra: dict, param: str, words: str
) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
    ):
        response = httpx.post(f"{server.url}{path}", json={**body, **extra}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error
        assert ".cc:" not in error["message"]


def _stream_tool_calls(stream: openai.Stream) -> tuple[str, dict[int, dict], str | None]:
    """The content, the tool calls (assembled from their deltas) and the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            if delta.function is not None:
                call["name"] = call["name"] or delta.function.name
                call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_tool_choice_required(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, messages=MESSAGES, tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=120,
    )  # fmt: skip
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].message.content is None
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        schema = {"get_weather": WEATHER, "now": CLOCK}[call.function.name]["function"]
        jsonschema.validate(json.loads(call.function.arguments), schema["parameters"])
    content, streamed, finish = _stream_tool_calls(
        client.chat.completions.create(
            model=MODEL, temperature=0, messages=MESSAGES, tools=[WEATHER, CLOCK],
            tool_choice="required", max_tokens=120, stream=True,
        )
    )  # fmt: skip
    assert finish == "tool_calls"
    assert not content and [c["name"] for c in streamed.values()] == [
        c.function.name for c in calls
    ]
    assert [json.loads(c["arguments"]) for c in streamed.values()] == [
        json.loads(c.function.arguments) for c in calls
    ]


def test_named_tool_choice(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=choice,
        max_tokens=60, temperature=0,
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and reply.choices[0].finish_reason == "stop"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    _, streamed, _ = _stream_tool_calls(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], tool_choice=choice,
            max_tokens=60, temperature=0, stream=True,
        )
    )  # fmt: skip
    assert list(streamed) == [0] and streamed[0]["name"] == "get_weather"
    assert json.loads(streamed[0]["arguments"]) == arguments  # greedy: the same call
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            model=MODEL, temperature=0, messages=MESSAGES, tools=[WEATHER], max_tokens=5,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )  # fmt: skip


def test_auto_tool_choice_parses_hermes_calls(client: openai.OpenAI) -> None:
    # The demo model was never taught to call tools: a regex makes it write one call in
    # hermes' format, so the parser's path through the server is what is tested.
    forced = (
        r'Let me check\. <tool_call>\{"name": "get_weather", "arguments": '
        r'\{"city": "[a-z]{1,8}"\}\}</tool_call>'
    )
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=MODEL, temperature=0, messages=MESSAGES, tools=[WEATHER], max_tokens=120,
            stream=stream,
            extra_body={"guided_regex": forced},
        )  # fmt: skip
        if stream:
            content, calls, finish = _stream_tool_calls(reply)
            [call] = calls.values()
            name, arguments = call["name"], call["arguments"]
        else:
            message = reply.choices[0].message
            content, finish = message.content, reply.choices[0].finish_reason
            [tool_call] = message.tool_calls
            name, arguments = tool_call.function.name, tool_call.function.arguments
        assert content.strip() == "Let me check." and finish == "tool_calls"
        assert name == "get_weather" and re.fullmatch("[a-z]{1,8}", json.loads(arguments)["city"])
    plain = client.chat.completions.create(
        model=MODEL, temperature=0, messages=MESSAGES, tools=[WEATHER], max_tokens=30,
        extra_body={"guided_regex": "Sunny, no tools needed"},
    )  # fmt: skip
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == "Sunny, no tools needed"


def test_tool_turns_in_the_conversation(client: openai.OpenAI) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]  # fmt: skip
    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
