"""A request body becomes engine-ready prompts: parse and validate it, render the chat
template, tokenize, and build each prompt's SamplingParams.

Everything here is a pure function of the body's bytes, a PrepareContext and a tokenizer.
The server runs it in worker processes (workers.py), so no request, however large or
hostile, holds the event loop, and one that runs past its time budget can be stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lanner.engine.core import validate_prompt, validate_token_ids
from lanner.engine.detokenizer import decode_token
from lanner.engine.structured_output import validate_structured_outputs
from lanner.entrypoints.http_guards import OpenAIError, bad_request
from lanner.entrypoints.openai.limits import ServerLimits
from lanner.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    _SamplingFields,
)
from lanner.entrypoints.openai.tool_parsers import PARSERS, parameters_schema, required_schema
from lanner.model.tokenizer import bad_words_token_ids, render_chat_template
from lanner.sampling_params import SamplingParams, StructuredOutputsParams, check_unicode

# Characters of a bad value quoted back in an error message.
_ECHO_CHARS = 100

Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class PrepareContext:
    """What preparing a request needs to know about the server and its engine."""

    served_model_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    limits: ServerLimits
    max_prompt_chars: int  # limits.max_prompt_chars, resolved for this tokenizer
    model_max_len: int | None = None  # the model's max_position_embeddings
    # The model's generation_config.json sampling settings (SamplingParams fields), for
    # the fields a request leaves unset, as vLLM applies them.
    sampling_defaults: tuple[tuple[str, Any], ...] = ()
    # tool_choice "auto": the parser of the model's tool-call format (--tool-call-parser
    # with --enable-auto-tool-choice), or None (then "auto" is refused).
    tool_call_parser: str | None = None


@dataclass
class PreparedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams
    echo_text: str | None = None  # what the reply begins with (echo)
    first_token_text: str = ""  # the first prompt token's text (echoed logprobs show it)


@dataclass(frozen=True)
class ToolPlan:
    """How a chat reply's tool calls come about: "named" (the output is that function's
    arguments), "required" (a JSON array of calls) or "auto" (found by ``parser``)."""

    mode: str
    function_name: str | None = None
    parser: str | None = None


@dataclass
class PreparedRequest:
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[PreparedPrompt]
    # echo with max_tokens 0: the engine samples one token, which the reply leaves out.
    echo_only: bool = False
    tools: ToolPlan | None = None

    @property
    def num_sequences(self) -> int:
        """Sequences the engine will run: n per prompt."""
        return sum(p.params.n for p in self.prompts)


def prepare(
    kind: str, raw: bytes, context: PrepareContext, tokenizer: Any
) -> PreparedRequest | dict[str, Any]:
    """``kind`` is "completion" or "chat" (a PreparedRequest for the engine), or
    "tokenize" or "detokenize" (the response itself). Raises OpenAIError saying what to
    change."""
    if kind == "completion":
        return prepare_completion(raw, context, tokenizer)
    if kind == "chat":
        return prepare_chat(raw, context, tokenizer)
    if kind == "tokenize":
        return tokenize(raw, context, tokenizer)
    if kind == "detokenize":
        return detokenize(raw, context, tokenizer)
    raise ValueError(f"unknown request kind {kind!r}")


# -- parsing ----------------------------------------------------------------------------


def parse_body(raw: bytes, model: type[Body]) -> Body:
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise bad_request(*_describe(err)) from None


def _describe(err: ValidationError) -> tuple[str, str | None]:
    """A short message and the field it is about, from pydantic's first error; never the
    whole input (a body may be megabytes)."""
    first = err.errors(include_url=False)[0]
    kind = first.get("type")
    loc = [str(part) for part in first.get("loc", ())]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        hint = (
            " (a \\uD800-\\uDFFF escape must be half of a surrogate pair)"
            if "hex escape" in str(detail) or "surrogate" in str(detail)
            else ""
        )
        return f"malformed JSON in the request body: {detail}{hint}", None
    if not loc:
        return (
            f"the request body must be a JSON object of this endpoint's fields, got "
            f"{_json_kind(first.get('input'))}",
            None,
        )
    param = ".".join(loc)
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if "input" in first and kind != "missing":
        message += f" (got {_short(first['input'])})"
    return message, param


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."


# -- checks both endpoints share --------------------------------------------------------


def _check_model(model: str | None, context: PrepareContext) -> None:
    if model is not None and model not in context.served_model_names:
        raise OpenAIError(
            404,
            f"The model `{model[:200]}` does not exist; this server serves "
            f"{', '.join(repr(m) for m in context.served_model_names)}.",
            "NotFoundError",
            "model",
        )


def _check_common(body: _SamplingFields, context: PrepareContext) -> None:
    limits = context.limits
    _check_model(body.model, context)
    if not 1 <= body.n <= limits.max_n:
        raise bad_request(
            f"n must be an integer in [1, {limits.max_n}] on this server (--max-n), got {body.n}",
            "n",
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise bad_request(
            f"stop has {len(stops)} strings; this server takes at most "
            f"{limits.max_stop_strings} (--max-stop-strings)",
            "stop",
        )
    for stop in stops:
        if len(stop) > limits.max_stop_string_chars:
            raise bad_request(
                f"a stop string has {len(stop)} characters; this server takes at most "
                f"{limits.max_stop_string_chars} (--max-stop-string-chars)",
                "stop",
            )
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    bad_words = body.bad_words or []
    if len(bad_words) > limits.max_stop_strings:
        raise bad_request(
            f"bad_words has {len(bad_words)} entries; this server takes at most "
            f"{limits.max_stop_strings} (--max-stop-strings)",
            "bad_words",
        )
    if any(len(word) > limits.max_stop_string_chars for word in bad_words):
        raise bad_request(
            f"a bad word is longer than this server's {limits.max_stop_string_chars} "
            f"characters (--max-stop-string-chars)",
            "bad_words",
        )
    if len(body.logit_bias or {}) > limits.max_logit_bias:
        raise bad_request(
            f"logit_bias has {len(body.logit_bias or {})} entries; this server takes at most "
            f"{limits.max_logit_bias} (--max-logit-bias)",
            "logit_bias",
        )
    _check_logprobs(body.prompt_logprobs, "prompt_logprobs", limits)
    if body.truncate_prompt_tokens is not None and body.truncate_prompt_tokens < 1:
        raise bad_request(
            f"truncate_prompt_tokens must be >= 1, got {body.truncate_prompt_tokens}",
            "truncate_prompt_tokens",
        )
    num_stop_ids = len(body.stop_token_ids or [])
    if num_stop_ids > limits.max_stop_token_ids:
        raise bad_request(
            f"stop_token_ids has {num_stop_ids} ids; this server takes at most "
            f"{limits.max_stop_token_ids} (--max-stop-token-ids)",
            "stop_token_ids",
        )


def _check_logprobs(value: int | None, name: str, limits: ServerLimits) -> None:
    if value is not None and not 0 <= value <= limits.max_logprobs:
        raise bad_request(
            f"{name} must be an integer in [0, {limits.max_logprobs}], got {value}", name
        )


def _check_text(text: str, name: str, context: PrepareContext) -> None:
    if len(text) > context.max_prompt_chars:
        raise bad_request(
            f"the {name} has {len(text)} characters, more than this server tokenizes "
            f"({context.max_prompt_chars}: --max-prompt-chars; at most {context.max_model_len} "
            f"tokens fit the model's context); shorten the {name}",
            name,
        )
    try:
        check_unicode(f"the {name}", text)
    except ValueError as err:
        raise bad_request(str(err), name) from None


def _checked_ids(token_ids: list[int], context: PrepareContext, param: str) -> list[int]:
    try:
        validate_prompt(token_ids, context.max_model_len, context.vocab_size, context.model_max_len)
    except ValueError as err:
        raise bad_request(str(err), param) from None
    return token_ids


def _max_tokens(
    requested: int | None, field: str, prompt_len: int, where: str, context: PrepareContext
) -> int:
    """The request's max_tokens; left unset (None), the model's max_new_tokens, else the
    room left in the context, whichever is smaller."""
    limit = context.max_model_len
    if requested is None:
        default = dict(context.sampling_defaults).get("max_tokens")
        room = limit - prompt_len
        return room if default is None else max(1, min(default, room))
    if requested < 1:
        raise bad_request(f"{field} must be an integer >= 1, got {requested!r}", field)
    if prompt_len + requested > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {where}, "
            f"{requested} in the completion). Please reduce the length of the {where} "
            f"or {field}.",
            field,
        )
    return requested


def _param_of(message: str) -> str | None:
    """The SamplingParams field a validation message is about (they start with it)."""
    first = message.split(" ", 1)[0].split("[", 1)[0]  # "logit_bias[5] must ..."
    return first if first in SamplingParams.field_names() else None


def _sampling_params(
    body: _SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    context: PrepareContext,
    tokenizer: Any,
    constraint: StructuredOutputsParams | None = None,
) -> SamplingParams:
    kwargs = {**dict(context.sampling_defaults), **body.sampling_kwargs()}
    kwargs["max_tokens"] = max_tokens
    if prompt_logprobs is not None:
        kwargs["prompt_logprobs"] = prompt_logprobs
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    if kwargs.get("min_tokens", 0) > max_tokens:
        kwargs["min_tokens"] = max_tokens
    if body.logit_bias:
        kwargs["logit_bias"] = _logit_bias(body.logit_bias)
    if body.bad_words:
        kwargs["bad_words_token_ids"] = bad_words_token_ids(tokenizer, body.bad_words)
    if constraint is not None:
        kwargs["structured_outputs"] = constraint
    try:
        params = SamplingParams(**kwargs)
        validate_token_ids(params, context.vocab_size)
    except ValueError as err:
        raise bad_request(str(err), _param_of(str(err))) from None
    return params


def structured_outputs_of(body: _SamplingFields) -> tuple[StructuredOutputsParams, str] | None:
    """The request's output constraint and the field it came in, from whichever of
    response_format, structured_outputs and guided_* it uses (400 for more than one);
    checked (an invalid schema, regex or grammar is a 400 naming the field)."""
    found: list[tuple[str, dict[str, Any]]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            spec = response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise bad_request(
                    "response_format json_schema needs json_schema.schema", "response_format"
                )
            found.append(("response_format", {"json": spec.json_schema}))
    if body.structured_outputs is not None:
        fields = body.structured_outputs.model_dump(exclude_none=True)
        found.append(("structured_outputs", fields))
    for name, key, value in (
        ("guided_json", "json", body.guided_json),
        ("guided_regex", "regex", body.guided_regex),
        ("guided_choice", "choice", body.guided_choice),
        ("guided_grammar", "grammar", body.guided_grammar),
    ):
        if value is not None:
            found.append((name, {key: value}))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"give one output constraint, not several ({names})", found[1][0])
    param, fields = found[0]
    try:
        constraint = StructuredOutputsParams(**fields)
        validate_structured_outputs(constraint)
    except (TypeError, ValueError) as err:
        raise bad_request(str(err), param) from None
    return constraint, param


def _logit_bias(raw: dict[str, float]) -> dict[int, float]:
    """JSON object keys are strings: "42" -> 42."""
    bias = {}
    for key, value in raw.items():
        token_id = key.strip()
        if not token_id.isdigit() or not token_id.isascii():
            raise bad_request(
                f"logit_bias keys must be token ids (non-negative integers), got {key[:50]!r}",
                "logit_bias",
            )
        bias[int(token_id)] = value
    return bias


def _token_ids(ids: list[int], body: _SamplingFields, context: PrepareContext) -> list[int]:
    """The prompt's ids, cut to their last truncate_prompt_tokens, checked."""
    if body.truncate_prompt_tokens is not None:
        ids = ids[-body.truncate_prompt_tokens :]
    return _checked_ids(
        ids, context, "prompt" if isinstance(body, CompletionRequest) else "messages"
    )


# -- completions ------------------------------------------------------------------------


def prepare_completion(raw: bytes, context: PrepareContext, tokenizer: Any) -> PreparedRequest:
    body = parse_body(raw, CompletionRequest)
    _check_common(body, context)
    if body.suffix:
        raise bad_request(
            "suffix (fill-in-the-middle) is not supported: it needs a model trained with FIM "
            "tokens (such as StarCoder or Qwen2.5-Coder) and its prompt format, which lanner "
            "does not build yet; send the prefix as the prompt",
            "suffix",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (use n)", "best_of")
    _check_logprobs(body.logprobs, "logprobs", context.limits)
    constrained = structured_outputs_of(body)
    echo_only = body.max_tokens == 0
    if echo_only and not body.echo:
        raise bad_request("max_tokens must be >= 1 (0 only with echo: true)", "max_tokens")
    # Echoed logprobs cover the prompt too: its positions are scored as prompt logprobs.
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
    raw_prompt = body.prompt
    if isinstance(raw_prompt, str):
        items: list[str | list[int]] = [raw_prompt]
    elif raw_prompt and all(isinstance(t, int) for t in raw_prompt):
        items = [list(raw_prompt)]  # type: ignore[arg-type]
    else:
        items = list(raw_prompt)  # type: ignore[arg-type]
    if not items:
        raise bad_request("prompt is empty; give a string, a list of them or token ids", "prompt")
    if len(items) * body.n > context.limits.max_n:
        # Each sequence is an engine request built on the event loop: bound them all.
        raise bad_request(
            f"this request asks for {len(items) * body.n} sequences (n={body.n} for each of "
            f"{len(items)} prompts); this server takes at most {context.limits.max_n} per "
            f"request (--max-n)",
            "prompt",
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            _check_text(item, "prompt", context)
            ids = tokenizer.encode(item)
            if not ids:
                raise bad_request("the prompt is empty; give at least one token", "prompt")
            text: str | None = item
        else:
            text, ids = None, list(item)
        untruncated = len(ids)
        ids = _token_ids(ids, body, context)
        if len(ids) < untruncated:
            text = None  # the text is of the whole prompt
        requested = 1 if echo_only else _requested_max_tokens(body, context)
        max_tokens = _max_tokens(requested, "max_tokens", len(ids), "prompt", context)
        params = _sampling_params(
            body,
            max_tokens,
            body.logprobs,
            prompt_logprobs,
            context,
            tokenizer,
            constrained[0] if constrained else None,
        )
        prompt = PreparedPrompt(text, ids, params)
        if body.echo:
            prompt.echo_text = text if text is not None else _decode(tokenizer, ids, body)
            prompt.first_token_text = decode_token(tokenizer, ids[0])
        prompts.append(prompt)
    return PreparedRequest(body, prompts, echo_only=echo_only)


def _requested_max_tokens(body: CompletionRequest, context: PrepareContext) -> int | None:
    """max_tokens as sent; left out, None when the model sets max_new_tokens (so that
    applies), else OpenAI's default of 16."""
    if "max_tokens" in body.model_fields_set or "max_tokens" not in dict(context.sampling_defaults):
        return body.max_tokens
    return None


def _decode(tokenizer: Any, ids: list[int], body: _SamplingFields) -> str:
    return tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens)


# -- chat -------------------------------------------------------------------------------


def prepare_chat(raw: bytes, context: PrepareContext, tokenizer: Any) -> PreparedRequest:
    body = parse_body(raw, ChatCompletionRequest)
    _check_common(body, context)
    constrained = structured_outputs_of(body)
    plan, tool_constraint = tool_plan(body, context)
    if tool_constraint is not None:
        if constrained is not None:
            raise bad_request(
                f"tool_choice {body.tool_choice if isinstance(body.tool_choice, str) else 'named'} "
                f"constrains the output already; leave out {constrained[1]}",
                constrained[1],
            )
        constrained = (tool_constraint, "tool_choice")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        _check_logprobs(body.top_logprobs, "top_logprobs", context.limits)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] or None
    text = _render_chat(body, tools, context, tokenizer)
    ids = _token_ids(tokenizer.encode(text, add_special_tokens=False), body, context)
    if body.max_completion_tokens is not None:
        requested, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, field = body.max_tokens, "max_tokens"
    max_tokens = _max_tokens(requested, field, len(ids), "messages", context)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(
        body,
        max_tokens,
        logprobs,
        body.prompt_logprobs,
        context,
        tokenizer,
        constrained[0] if constrained else None,
    )
    prompt = PreparedPrompt(text, ids, params)
    if body.echo and body.messages[-1].role == "assistant":
        prompt.echo_text = body.messages[-1].text()
    return PreparedRequest(body, [prompt], tools=plan)


def _render_chat(
    body: ChatCompletionRequest | TokenizeChatRequest,
    tools: list[dict[str, Any]] | None,
    context: PrepareContext,
    tokenizer: Any,
) -> str:
    """The conversation through the chat template, every input and the output bounded."""
    if body.chat_template is not None:
        if not context.limits.trust_request_chat_template:
            raise bad_request(
                "this server does not run chat templates sent with a request; leave out "
                "chat_template, or start the server with --trust-request-chat-template",
                "chat_template",
            )
        _check_text(body.chat_template, "chat_template", context)
    try:
        conversation = [message.as_template_input() for message in body.messages]
    except ValueError as err:
        raise bad_request(str(err), "messages") from None
    _check_text("".join(m["role"] + m["content"] for m in conversation), "messages", context)
    try:
        text = render_chat_template(
            tokenizer, conversation, body.add_generation_prompt, body.chat_template, tools
        )
    except ValueError as err:  # ChatTemplateError, or the model has no template
        raise bad_request(str(err), "chat_template") from None
    # The template's output is a prompt like any other (and bounds what a template makes).
    _check_text(text, "chat_template" if body.chat_template else "messages", context)
    return text


# -- tokenize / detokenize (vLLM's endpoints) -------------------------------------------


def tokenize(raw: bytes, context: PrepareContext, tokenizer: Any) -> dict[str, Any]:
    """/tokenize: a prompt, or messages through the chat template, as token ids."""
    try:
        is_chat = "messages" in json.loads(raw)
    except (ValueError, TypeError):
        is_chat = False  # parse_body below says what is wrong with the body
    body: TokenizeCompletionRequest | TokenizeChatRequest = parse_body(
        raw, TokenizeChatRequest if is_chat else TokenizeCompletionRequest
    )
    _check_model(body.model, context)
    if isinstance(body, TokenizeChatRequest):
        text = _render_chat(body, body.tools, context, tokenizer)
    else:
        _check_text(body.prompt, "prompt", context)
        text = body.prompt
    ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    return {
        "count": len(ids),
        "max_model_len": context.max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    }


def detokenize(raw: bytes, context: PrepareContext, tokenizer: Any) -> dict[str, Any]:
    """/detokenize: token ids as text; at most a context's worth, all in the vocabulary."""
    body = parse_body(raw, DetokenizeRequest)
    _check_model(body.model, context)
    if len(body.tokens) > context.max_model_len:
        raise bad_request(
            f"tokens has {len(body.tokens)} ids; this server detokenizes at most "
            f"{context.max_model_len} (max_model_len) at once",
            "tokens",
        )
    outside = sorted({t for t in body.tokens if not 0 <= t < context.vocab_size})
    if outside:
        raise bad_request(
            f"tokens has ids {outside[:5]} outside the vocabulary [0, {context.vocab_size})",
            "tokens",
        )
    return {"prompt": tokenizer.decode(body.tokens)}


def tool_plan(
    body: ChatCompletionRequest, context: PrepareContext
) -> tuple[ToolPlan | None, StructuredOutputsParams | None]:
    """How the reply's tool calls come about, and the constraint that forces them
    (tool_choice "required" or a named function), from tools and tool_choice."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None, None
    if choice == "none":
        return None, None
    if choice == "required":
        schema = required_schema(body.tools, body.parallel_tool_calls)
        # Compact JSON: calls are parsed, not read, and free whitespace lets a model stall.
        constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return ToolPlan("required"), constraint
    if choice is None or choice == "auto":
        if context.tool_call_parser is None:
            raise bad_request(
                "tool_choice 'auto' (the default when tools are given) needs the server "
                "started with --enable-auto-tool-choice --tool-call-parser NAME "
                f"({', '.join(sorted(PARSERS))}); or send tool_choice 'required', 'none' "
                "or a named function",
                "tool_choice",
            )
        return ToolPlan("auto", parser=context.tool_call_parser), None
    by_name = {tool.function.name: tool for tool in body.tools}
    wanted = choice.function.name
    if wanted not in by_name:
        raise bad_request(
            f"tool_choice names {wanted[:100]!r}, which is not among the tools "
            f"({', '.join(sorted(by_name))[:300]})",
            "tool_choice",
        )
    schema = parameters_schema(by_name[wanted].function)
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return ToolPlan("named", function_name=wanted), constraint
