"""Tool calls: the JSON schemas that make a model call a tool (tool_choice "required" or a
named function), and parsers that find calls in a model's free text (tool_choice "auto")
in the formats models are trained on: hermes-style ``<tool_call>`` JSON and Llama-3 JSON."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

# A function without parameters takes an object with none.
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parameters_schema(function: Any) -> dict[str, Any]:
    return function.parameters or _EMPTY_PARAMETERS


def required_schema(tools: list[Any], parallel: bool) -> dict[str, Any]:
    """tool_choice "required": a JSON array of at least one call, each
    ``{"name": <a tool's name>, "parameters": <that tool's arguments>}``."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "parameters": parameters_schema(tool.function),
            },
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_required(text: str) -> list[ParsedToolCall]:
    """The calls of a tool_choice "required" output (it follows required_schema)."""
    calls = json.loads(text)
    return [
        ParsedToolCall(call["name"], json.dumps(call["parameters"], ensure_ascii=False))
        for call in calls
    ]


def _call_from(value: Any) -> ParsedToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return ParsedToolCall(value["name"], arguments)
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser:
    """Finds tool calls in text. ``markers``: text that starts a call, so a stream can
    send what comes before as content and hold the rest until the output ends."""

    markers: tuple[str, ...] = ()

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(the content around the calls, or None; the calls)."""
        raise NotImplementedError

    def content_before_call(self, text: str) -> tuple[str, bool]:
        """The part of ``text`` that is surely content (before any marker, or before a
        trailing piece that could still become one), and whether a marker was seen."""
        cut = len(text)
        for marker in self.markers:
            found = text.find(marker)
            if found >= 0:
                cut = min(cut, found)
        if cut < len(text):
            return text[:cut], True
        # Hold back a tail that is the start of a marker.
        for marker in self.markers:
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    cut = min(cut, len(text) - size)
                    break
        return text[:cut], False


class HermesToolParser(ToolParser):
    """Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    any number of them, content around them."""

    markers = ("<tool_call>",)
    _end = "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls: list[ParsedToolCall] = []
        content_parts: list[str] = []
        rest = text
        while True:
            start = rest.find(self.markers[0])
            if start < 0:
                content_parts.append(rest)
                break
            content_parts.append(rest[:start])
            body_start = start + len(self.markers[0])
            end = rest.find(self._end, body_start)
            body = rest[body_start:] if end < 0 else rest[body_start:end]
            try:
                call = _call_from(json.loads(body))
            except ValueError:
                call = None
            if call is None:  # not a call after all: it stays text
                content_parts.append(
                    rest[start:] if end < 0 else rest[start : end + len(self._end)]
                )
            else:
                calls.append(call)
            if end < 0:
                break
            rest = rest[end + len(self._end) :]
        content = "".join(content_parts).strip()
        return (content or None), calls


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 style: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after
    ``<|python_tag|>``), several separated by ``;``; any other reply is content."""

    markers = ("<|python_tag|>", "{")

    def content_before_call(self, text: str) -> tuple[str, bool]:
        # A call is the whole reply: only a reply that starts as one is held back.
        stripped = text.lstrip()
        if stripped.startswith(self.markers):
            return "", True
        if not stripped or self.markers[0].startswith(stripped):
            return "", False
        return text, False

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text or None, []
        decoder = json.JSONDecoder()
        calls: list[ParsedToolCall] = []
        position = 0
        while position < len(body):
            try:
                value, position = decoder.raw_decode(body, position)
            except ValueError:
                return text, []
            call = _call_from(value)
            if call is None:
                return text, []
            calls.append(call)
            while position < len(body) and body[position] in " \n\t;":
                position += 1
        return None, calls


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}
