"""OpenAI's response shapes for completions and chat: whole responses and the stream's
chunks, built from the engine's cumulative RequestOutputs (with vLLM's extras: echo,
prompt_logprobs, token ids, usage on every chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lanner.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from lanner.entrypoints.openai.prepare import ToolPlan
from lanner.entrypoints.openai.tool_parsers import PARSERS, ParsedToolCall, parse_required


@dataclass(frozen=True)
class ResponseOptions:
    request_id: str
    created: int
    model: str
    n: int
    # Per prompt: text the reply begins with (completions' echo of the prompt, chat's
    # echo of the last assistant message), or None.
    echo_texts: tuple[str | None, ...]
    # Per prompt: its first token's text (echoed logprobs list it, with logprob None).
    first_token_texts: tuple[str, ...] = ()
    # echo with max_tokens 0: the engine samples one token, which the reply leaves out.
    echo_only: bool = False
    # Top logprobs per token (completions' logprobs, chat's top_logprobs); None: no logprobs.
    logprobs: int | None = None
    return_token_ids: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # usage on every chunk
    # Chat with tools: how the reply's tool calls come about (prepare.ToolPlan), or None.
    tools: ToolPlan | None = None


class _ChoiceState:
    """What one choice has streamed so far."""

    def __init__(self) -> None:
        self.started = False
        self.chars = 0
        self.tokens = 0
        self.done = False
        # Tool calls: characters of the text sent as content, and the named call's id.
        self.content_chars = 0
        self.call_id = ""


class ResponseFormat:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, options: ResponseOptions) -> None:
        self.options = options
        self._sent: dict[int, _ChoiceState] = {}
        self._latest: dict[int, RequestOutput] = {}  # per prompt, for usage on every chunk

    # -- shared ------------------------------------------------------------------------

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.options.request_id,
            "object": self.chunk_object_name if chunk else self.object_name,
            "created": self.options.created,
            "model": self.options.model,
            "choices": choices,
        }

    def generated(self, completion: CompletionOutput) -> tuple[str, list[int]]:
        """The completion's text and tokens as the reply shows them."""
        if self.options.echo_only:
            return "", []
        return completion.text, completion.token_ids

    def usage(self, outputs: list[RequestOutput]) -> dict[str, int]:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(self.generated(c)[1]) for o in outputs for c in o.outputs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        chunk = self._envelope([], chunk=True)
        chunk["usage"] = self.usage(outputs)
        return chunk

    # -- streaming ---------------------------------------------------------------------

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        """The stream chunks for whatever moved since the last call."""
        self._latest[prompt_index] = output
        chunks = []
        for completion in output.outputs:
            index = prompt_index * self.options.n + completion.index
            state = self._sent.setdefault(index, _ChoiceState())
            if state.done:
                continue
            released = "" if self.options.echo_only else completion.released_text
            _, tokens = self.generated(completion)
            finished = completion.finish_reason is not None
            delta = released[state.chars :]
            # A choice speaks once it has a token (an n > 1 sibling may start later).
            if not finished and (len(tokens) <= state.tokens or not tokens) and not delta:
                continue
            first = not state.started
            choice = self._choice_delta(prompt_index, index, output, completion, delta, state)
            state.chars = len(released)
            state.tokens = len(tokens)
            state.done = finished
            if choice is None:
                continue  # held back (text that may become a tool call)
            state.started = True
            chunk = self._envelope([choice], chunk=True)
            if first:
                self._on_first_chunk(chunk, output)
            if self.options.continuous_usage:
                chunk["usage"] = self.usage(list(self._latest.values()))
            chunks.append(chunk)
        return chunks

    def _on_first_chunk(self, chunk: dict[str, Any], output: RequestOutput) -> None:
        """Fields a choice's first chunk carries once (prompt token ids, ...)."""

    def _choice_delta(
        self,
        prompt_index: int,
        index: int,
        output: RequestOutput,
        completion: CompletionOutput,
        delta: str,
        state: _ChoiceState,
    ) -> dict[str, Any] | None:
        """A choice's next chunk (None: nothing to send yet); called before ``state``
        moves past this call's text and tokens."""
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _logprobs(
        self,
        output: RequestOutput,
        completion: CompletionOutput,
        start: int,
        with_prompt: int | None,
    ) -> dict[str, Any] | None:
        """OpenAI's legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset. With
        ``with_prompt`` (echo: the prompt's index), the prompt's positions come first, the
        first one with logprob None."""
        if self.options.logprobs is None:
            return None
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        if with_prompt is not None:
            positions = output.prompt_logprobs or []
            for token_id, position in zip(output.prompt_token_ids, positions, strict=False):
                if position is None:  # the first token: nothing predicts it
                    tokens.append(self.options.first_token_texts[with_prompt])
                    token_logprobs.append(None)
                    top_logprobs.append(None)
                    continue
                self._append_position(position, token_id, tokens, token_logprobs, top_logprobs)
        _, generated = self.generated(completion)
        for token_id, position in zip(
            generated[start:], (completion.logprobs or [])[start:], strict=False
        ):
            self._append_position(position, token_id, tokens, token_logprobs, top_logprobs)
        offsets, offset = [], 0
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def _append_position(
        self,
        position: PositionLogprobs,
        token_id: int,
        tokens: list[str],
        token_logprobs: list[float | None],
        top_logprobs: list[dict[str, float] | None],
    ) -> None:
        chosen = position[token_id]
        top = self.options.logprobs or 0
        tokens.append(chosen.decoded_token or "")
        token_logprobs.append(chosen.logprob)
        ranked = [lp for lp in position.values() if lp.rank is not None and lp.rank <= top]
        entries = {(lp.decoded_token or ""): lp.logprob for lp in ranked}
        entries[chosen.decoded_token or ""] = chosen.logprob
        top_logprobs.append(entries)

    def _choice_delta(
        self,
        prompt_index: int,
        index: int,
        output: RequestOutput,
        completion: CompletionOutput,
        delta: str,
        state: _ChoiceState,
    ) -> dict[str, Any]:
        echo = self.options.echo_texts[prompt_index]
        first = not state.started
        choice = {
            "index": index,
            "text": (echo or "") + delta if first else delta,
            "logprobs": self._logprobs(
                output, completion, state.tokens, prompt_index if first and echo else None
            ),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        }
        if self.options.return_token_ids:
            choice["token_ids"] = self.generated(completion)[1][state.tokens :]
            if first:
                choice["prompt_token_ids"] = output.prompt_token_ids
        return choice

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(outputs):
            echo = self.options.echo_texts[prompt_index]
            for completion in output.outputs:
                text, tokens = self.generated(completion)
                choice = {
                    "index": prompt_index * self.options.n + completion.index,
                    "text": (echo or "") + text,
                    "logprobs": self._logprobs(
                        output, completion, 0, prompt_index if echo is not None else None
                    ),
                    "finish_reason": completion.finish_reason,
                    "stop_reason": completion.stop_reason,
                    "prompt_logprobs": prompt_logprobs(output),
                }
                if self.options.return_token_ids:
                    choice["prompt_token_ids"] = output.prompt_token_ids
                    choice["token_ids"] = tokens
                choices.append(choice)
        body = self._envelope(choices, chunk=False)
        body["usage"] = self.usage(outputs)
        return body


def prompt_logprobs(output: RequestOutput) -> list[dict[str, Any] | None] | None:
    """vLLM's shape: per prompt position, None for the first, else token id -> logprob."""
    if output.prompt_logprobs is None:
        return None
    return [
        None
        if position is None
        else {
            str(token_id): {
                "logprob": lp.logprob,
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for token_id, lp in position.items()
        }
        for position in output.prompt_logprobs
    ]


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        if self.options.logprobs is None or completion.logprobs is None:
            return None
        top = self.options.logprobs
        content = []
        _, generated = self.generated(completion)
        for token_id, position in zip(generated[start:], completion.logprobs[start:], strict=False):
            sampled = position[token_id]
            entry = _token_entry(sampled.decoded_token or "", sampled.logprob)
            ranked = sorted(
                (lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                key=_rank,
            )
            entry["top_logprobs"] = [
                _token_entry(lp.decoded_token or "", lp.logprob) for lp in ranked[:top]
            ]
            content.append(entry)
        return {"content": content}

    def _choice_delta(
        self,
        prompt_index: int,
        index: int,
        output: RequestOutput,
        completion: CompletionOutput,
        delta: str,
        state: _ChoiceState,
    ) -> dict[str, Any] | None:
        message: dict[str, Any] = {}
        if not state.started:
            # The role comes with the first generated content, as vLLM sends it: a client
            # timing the first chunk then times the first token, not the admission.
            message["role"] = "assistant"
            delta = (self.options.echo_texts[prompt_index] or "") + delta
        finish_reason = completion.finish_reason
        plan = self.options.tools
        if plan is None:
            if delta or not state.started:
                message["content"] = delta
        else:
            message, finish_reason = self._tool_delta(plan, message, completion, delta, state)
            if message is None:
                return None
        choice = {
            "index": index,
            "delta": message,
            "logprobs": self._logprobs(completion, state.tokens),
            "finish_reason": finish_reason,
            "stop_reason": completion.stop_reason,
        }
        if self.options.return_token_ids:
            choice["token_ids"] = self.generated(completion)[1][state.tokens :]
        return choice

    def _tool_delta(
        self,
        plan: ToolPlan,
        message: dict[str, Any],
        completion: CompletionOutput,
        delta: str,
        state: _ChoiceState,
    ) -> tuple[dict[str, Any] | None, str | None]:
        """A tool-using reply's next delta, as OpenAI streams them: a named call's
        arguments as they are generated (its first chunk carries id and name); "required"
        and "auto" calls whole, once the output ends ("auto" streams the content before
        a call as it comes)."""
        finished = completion.finish_reason is not None
        if plan.mode == "named":
            call: dict[str, Any] = {"index": 0, "function": {"arguments": delta}}
            if not state.call_id:
                state.call_id = ParsedToolCall(plan.function_name or "", "").id
                call.update(id=state.call_id, type="function")
                call["function"] = {"name": plan.function_name, "arguments": delta}
            message["tool_calls"] = [call]
            return message, completion.finish_reason
        released = completion.released_text
        if not finished:
            if plan.mode == "required":
                return (message if "role" in message else None), None
            parser = PARSERS[plan.parser or ""]()
            content, _ = parser.content_before_call(released)
            fresh = content[state.content_chars :]
            state.content_chars = len(content)
            if not fresh and "role" not in message:
                return None, None
            message["content"] = fresh
            return message, None
        content, calls = self._tool_calls(plan, completion.text)
        if not calls:  # no call after all: what was held is content
            message["content"] = completion.text[state.content_chars :]
            return message, completion.finish_reason
        if content and plan.mode == "auto" and len(content) > state.content_chars:
            message["content"] = content[state.content_chars :]
        message["tool_calls"] = [{"index": i, **call.as_openai()} for i, call in enumerate(calls)]
        return message, self._finish_reason(plan, completion, calls)

    @staticmethod
    def _tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a finished reply."""
        if plan.mode == "named":
            return None, [ParsedToolCall(plan.function_name or "", text)]
        if plan.mode == "required":
            try:
                return None, parse_required(text)
            except (ValueError, KeyError, TypeError):
                return text, []  # cut short (length): no complete call
        return PARSERS[plan.parser or ""]().parse(text)

    @staticmethod
    def _finish_reason(
        plan: ToolPlan, completion: CompletionOutput, calls: list[ParsedToolCall]
    ) -> str | None:
        # As OpenAI (and vLLM): calls made under "auto" or "required" end with
        # "tool_calls"; a named call keeps the engine's reason.
        if calls and plan.mode != "named" and completion.finish_reason == "stop":
            return "tool_calls"
        return completion.finish_reason

    def _on_first_chunk(self, chunk: dict[str, Any], output: RequestOutput) -> None:
        if self.options.return_token_ids:
            chunk["prompt_token_ids"] = output.prompt_token_ids

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        [output] = outputs
        echo = self.options.echo_texts[0] or ""
        choices = []
        for completion in output.outputs:
            text, tokens = self.generated(completion)
            message: dict[str, Any] = {"role": "assistant", "content": echo + text}
            finish_reason = completion.finish_reason
            plan = self.options.tools
            if plan is not None:
                content, calls = self._tool_calls(plan, text)
                if calls:
                    message = {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [call.as_openai() for call in calls],
                    }
                    finish_reason = self._finish_reason(plan, completion, calls)
            choice = {
                "index": completion.index,
                "message": message,
                "logprobs": self._logprobs(completion, 0),
                "finish_reason": finish_reason,
                "stop_reason": completion.stop_reason,
            }
            if self.options.return_token_ids:
                choice["token_ids"] = tokens
            choices.append(choice)
        body = self._envelope(choices, chunk=False)
        body["usage"] = self.usage(outputs)
        body["prompt_logprobs"] = prompt_logprobs(output)
        if self.options.return_token_ids:
            body["prompt_token_ids"] = output.prompt_token_ids
        return body


def _rank(logprob: Any) -> int:
    return logprob.rank
