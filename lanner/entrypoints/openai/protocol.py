"""Request bodies of the OpenAI API (pydantic), with vLLM's extra sampling fields.

Every integer field is bounded to 64 bits here (``Int64``): past that, nothing downstream
(msgpack to the engine core, torch on the device) can carry it, and it must be a 400.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lanner.model.tokenizer import message_text
from lanner.sampling_params import INT64_MAX, INT64_MIN

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def documented(**bounds: float) -> Any:
    """A field whose range /openapi.json states (``minimum``, ``maximum``, ...) while the
    check itself stays with SamplingParams, whose errors say what to change."""
    return Field(default=None, json_schema_extra=bounds)  # type: ignore[arg-type]


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do (clients send newer fields).
    model_config = ConfigDict(extra="ignore")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIBaseModel):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow BaseModel.schema: kept under an alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(OpenAIBaseModel):
    """vLLM's ``structured_outputs`` extra: one constraint on the output."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool | None = None


class _SamplingFields(OpenAIBaseModel):
    """Fields both endpoints share; the sampling ones map onto SamplingParams."""

    model: str | None = None
    n: Int64 = Field(default=1, json_schema_extra={"minimum": 1})
    temperature: float | None = documented(minimum=0)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    presence_penalty: float | None = documented(minimum=-2, maximum=2)
    frequency_penalty: float | None = documented(minimum=-2, maximum=2)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Int64 | None = documented(minimum=-1)
    min_p: float | None = documented(minimum=0, maximum=1)
    repetition_penalty: float | None = documented(exclusiveMinimum=0)
    ignore_eos: bool = False
    min_tokens: Int64 = Field(default=0, json_schema_extra={"minimum": 0})
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: Int64 = 0
    request_id: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    allowed_token_ids: list[Int64] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: Int64 | None = documented(minimum=0)
    # Keep only the prompt's last k tokens (vLLM's left truncation).
    truncate_prompt_tokens: Int64 | None = documented(minimum=1)
    # Add prompt_token_ids and each choice's token_ids to the response (vLLM's extra).
    return_token_ids: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, and the
    # older guided_* spellings; at most one of them per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields this body sets (None means the default)."""
        values: dict[str, Any] = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
        }
        return {name: value for name, value in values.items() if value is not None}


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    max_tokens: Int64 | None = Field(default=16, json_schema_extra={"minimum": 0})
    logprobs: Int64 | None = documented(minimum=0)
    echo: bool = False  # the prompt, then the completion (max_tokens may be 0)
    suffix: str | None = None
    best_of: Int64 | None = None


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant turn that called tools, and a tool's answer to one of those calls.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        return message_text(self.content)

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates read it: role and content, and the name, tool
        calls (their arguments as objects, as templates print them) and tool call id when
        given."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(arguments: str | dict[str, Any]) -> dict[str, Any] | str:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int64 | None = documented(minimum=1)  # deprecated by OpenAI, still accepted
    max_completion_tokens: Int64 | None = documented(minimum=1)
    logprobs: bool = False
    top_logprobs: Int64 | None = documented(minimum=0)
    add_generation_prompt: bool = True
    # vLLM's: the reply begins with the last message when it is the assistant's own
    # (continuing a message the client started).
    echo: bool = False
    chat_template: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeCompletionRequest(OpenAIBaseModel):
    """vLLM's /tokenize for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    """vLLM's /tokenize for a conversation, rendered through the chat template first."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Int64]
