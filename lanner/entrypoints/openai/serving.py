"""The OpenAI endpoints' logic: a request body becomes engine requests, and their outputs
become OpenAI responses or server-sent-event streams."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lanner.engine.async_llm import AsyncLLM, EngineDeadError
from lanner.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from lanner.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
)
from lanner.sampling_params import MAX_LOGPROBS, SamplingParams


class OpenAIError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.status)


def error_body(message: str, error_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "BadRequestError", param)


def _param_of(message: str) -> str | None:
    """The SamplingParams field a validation message is about (they start with it)."""
    first = message.split(" ", 1)[0]
    return first if first in SamplingParams.field_names() else None


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


async def merge_outputs(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come; closing this closes them all
    (which aborts the unfinished ones)."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            # Close it now (not whenever it is collected), so an early exit aborts at once.
            close = getattr(streams[0], "aclose", None)
            if close is not None:
                await close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def drain(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output, None))
            queue.put_nowait((index, None, None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, err))

    tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # those whose task never started hold a request too
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLM,
        served_model_names: list[str],
        max_num_seqs: int,
        max_queued_requests: int | None = None,
    ) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    # -- checks --------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist; this server serves "
                f"{', '.join(repr(m) for m in self.served_model_names)}.",
                "NotFoundError",
                "model",
            )

    def check_capacity(self, num_requests: int) -> None:
        if self.engine.is_dead:
            raise OpenAIError(
                503, "the engine core is not running; restart the server", "EngineDeadError"
            )
        if self.max_queued_requests is None:
            return
        # Requests beyond what one batch runs wait in the queue; past the cap, refuse.
        limit = self.max_num_seqs + self.max_queued_requests
        if self.engine.num_unfinished_requests + num_requests > limit:
            raise OpenAIError(
                429,
                f"the server is at capacity ({self.engine.num_unfinished_requests} requests "
                f"in flight, at most {self.max_queued_requests} may wait); retry later",
                "RateLimitError",
            )

    def _max_tokens(self, requested: int | None, field: str, prompt_len: int, where: str) -> int:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the {where} has "
                f"{prompt_len} tokens, leaving no room for output; shorten the {where}.",
                "prompt" if where == "prompt" else "messages",
            )
        if requested is None:
            return limit - prompt_len
        if isinstance(requested, bool) or requested < 1:
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

    def _sampling_params(
        self, body: _SamplingFields, max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        kwargs = body.sampling_kwargs()
        kwargs["max_tokens"] = max_tokens
        if getattr(body, "prompt_logprobs", None) is not None:
            kwargs["prompt_logprobs"] = body.prompt_logprobs  # type: ignore[attr-defined]
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if kwargs.get("min_tokens", 0) > max_tokens:
            kwargs["min_tokens"] = max_tokens
        try:
            return SamplingParams(**kwargs)
        except ValueError as err:
            raise bad_request(str(err), _param_of(str(err))) from None

    def _prompt_from_ids(self, token_ids: list[int], param: str) -> _Prompt:
        try:
            self.engine.validate_prompt(token_ids)
        except ValueError as err:
            raise bad_request(str(err), param) from None
        return _Prompt(None, token_ids)

    # -- completions ---------------------------------------------------------------------

    def completion_prompts(self, body: CompletionRequest) -> list[_Prompt]:
        raw = body.prompt
        if isinstance(raw, str):
            items: list[str | list[int]] = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise bad_request(
                "prompt is empty; give a string, a list of them or token ids", "prompt"
            )
        prompts = []
        tokenizer = self.engine.tokenizer
        for item in items:
            if isinstance(item, str):
                ids = tokenizer.encode(item)
                if not ids:
                    raise bad_request("the prompt is empty; give at least one token", "prompt")
                prompt = self._prompt_from_ids(ids, "prompt")
                prompt.text = item
            else:
                prompt = self._prompt_from_ids(list(item), "prompt")
            prompts.append(prompt)
        return prompts

    async def create_completion(
        self, body: CompletionRequest, is_disconnected: Callable[[], Any]
    ) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(body.model)
        if body.echo:
            raise bad_request("echo is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of is not supported (use n)", "best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {body.logprobs}",
                "logprobs",
            )
        prompts = self.completion_prompts(body)
        params = [
            self._sampling_params(
                body,
                self._max_tokens(body.max_tokens, "max_tokens", len(p.token_ids), "prompt"),
                body.logprobs,
            )
            for p in prompts
        ]
        self.check_capacity(len(prompts))
        request_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = self._start(
            [
                (f"{request_id}-{i}", p, s)
                for i, (p, s) in enumerate(zip(prompts, params, strict=True))
            ],
            body.priority,
        )
        formatter = _CompletionFormat(request_id, created, self.model_name, params[0].n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(streams, formatter, include_usage)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    # -- chat ----------------------------------------------------------------------------

    def chat_prompt(self, body: ChatCompletionRequest) -> _Prompt:
        tokenizer = self.engine.tokenizer
        if body.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise bad_request(
                "this model's tokenizer has no chat template; pass chat_template or use "
                "/v1/completions",
                "chat_template",
            )
        try:
            conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                chat_template=body.chat_template,
            )
        except ValueError as err:
            raise bad_request(str(err), "messages") from None
        except Exception as err:  # noqa: BLE001 - a template error is the request's fault
            raise bad_request(f"the chat template failed: {err}", "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt = self._prompt_from_ids(ids, "messages")
        prompt.text = text
        return prompt

    async def create_chat_completion(
        self, body: ChatCompletionRequest, is_disconnected: Callable[[], Any]
    ) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(body.model)
        if body.tools:
            raise bad_request("tools are not supported", "tools")
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                    f"{body.top_logprobs}",
                    "top_logprobs",
                )
        prompt = self.chat_prompt(body)
        if body.max_completion_tokens is not None:
            requested, field = body.max_completion_tokens, "max_completion_tokens"
        else:
            requested, field = body.max_tokens, "max_tokens"
        max_tokens = self._max_tokens(requested, field, len(prompt.token_ids), "messages")
        params = self._sampling_params(
            body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None
        )
        self.check_capacity(1)
        request_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        formatter = _ChatFormat(
            request_id, int(time.time()), self.model_name, params.n, body.top_logprobs or 0
        )
        streams = self._start([(request_id, prompt, params)], body.priority)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(streams, formatter, include_usage)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    # -- shared --------------------------------------------------------------------------

    def _start(
        self, requests: list[tuple[str, _Prompt, SamplingParams]], priority: int
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue every request now (all or none), so errors become HTTP errors and the
        load check counts them at once."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, prompt, params in requests:
                streams.append(
                    self.engine.generate(
                        request_id, prompt.text, prompt.token_ids, params, priority
                    )
                )
        except EngineDeadError as err:
            self._abort([r[0] for r in requests[: len(streams)]])
            raise OpenAIError(503, str(err), "EngineDeadError") from err
        except ValueError as err:
            self._abort([r[0] for r in requests[: len(streams)]])
            param = "priority" if "priority" in str(err) else None
            param = "request_id" if "request id" in str(err) else param
            raise bad_request(str(err), param) from err
        return streams

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    async def _collect(
        self, streams: list[AsyncIterator[RequestOutput]], is_disconnected: Callable[[], Any]
    ) -> list[RequestOutput]:
        """Run to the end; abort everything if the client goes away meanwhile."""
        finals: dict[int, RequestOutput] = {}

        async def consume() -> None:
            async for index, output in merge_outputs(streams):
                finals[index] = output

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise OpenAIError(499, "the client disconnected", "ClientDisconnected")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._raise_engine_error(task.exception())
        return [finals[i] for i in range(len(streams))]

    @staticmethod
    def _raise_engine_error(error: BaseException | None) -> None:
        if error is None:
            return
        if isinstance(error, EngineDeadError):
            raise OpenAIError(500, str(error), "EngineDeadError") from error
        if isinstance(error, ValueError):
            raise bad_request(str(error)) from error
        raise error

    async def _stream(
        self,
        streams: list[AsyncIterator[RequestOutput]],
        formatter: _CompletionFormat | _ChatFormat,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            for chunk in formatter.start(len(streams)):
                yield sse(chunk)
            async for index, output in merge_outputs(streams):
                finals[index] = output
                for chunk in formatter.chunks(index, output):
                    yield sse(chunk)
            if include_usage:
                yield sse(formatter.usage_chunk([finals[i] for i in range(len(streams))]))
        except (EngineDeadError, ValueError) as err:
            status, kind = (
                (500, "EngineDeadError")
                if isinstance(err, EngineDeadError)
                else (
                    400,
                    "BadRequestError",
                )
            )
            yield sse(error_body(str(err), kind, None, status))
        yield sse("[DONE]")


# -- response shapes --------------------------------------------------------------------


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _StreamState:
    """What one choice has streamed so far."""

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0
        self.done = False


class _BaseFormat:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, created: int, model: str, n: int) -> None:
        self.request_id = request_id
        self.created = created
        self.model = model
        self.n = n
        self._sent: dict[int, _StreamState] = {}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.chunk_object_name if chunk else self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def start(self, num_prompts: int) -> list[dict[str, Any]]:
        return []

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        chunk = self._envelope([], chunk=True)
        chunk["usage"] = _usage(outputs)
        return chunk

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        """The stream chunks for whatever moved since the last call."""
        chunks = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            state = self._sent.setdefault(index, _StreamState())
            if state.done:
                continue
            delta = completion.released_text[state.chars :]
            new_tokens = len(completion.token_ids) - state.tokens
            finished = completion.finish_reason is not None
            if not delta and new_tokens <= 0 and not finished:
                continue
            choice = self._choice_delta(index, completion, delta, state.tokens)
            state.chars = len(completion.released_text)
            state.tokens = len(completion.token_ids)
            state.done = finished
            chunks.append(self._envelope([choice], chunk=True))
        return chunks

    def _choice_delta(
        self, index: int, completion: CompletionOutput, delta: str, first_token: int
    ) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_BaseFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _logprobs(self, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for token_id, position in zip(
            completion.token_ids[start:], completion.logprobs[start:], strict=False
        ):
            sampled = position[token_id]
            text = sampled.decoded_token or ""
            tokens.append(text)
            token_logprobs.append(sampled.logprob)
            top_logprobs.append({(lp.decoded_token or ""): lp.logprob for lp in position.values()})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def _choice_delta(
        self, index: int, completion: CompletionOutput, delta: str, first_token: int
    ) -> dict[str, Any]:
        return {
            "index": index,
            "text": delta,
            "logprobs": self._logprobs(completion, first_token),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        }

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(outputs):
            for completion in output.outputs:
                choices.append(
                    {
                        "index": prompt_index * self.n + completion.index,
                        "text": completion.text,
                        "logprobs": self._logprobs(completion, 0),
                        "finish_reason": completion.finish_reason,
                        "stop_reason": completion.stop_reason,
                        "prompt_logprobs": _prompt_logprobs(output),
                    }
                )
        body = self._envelope(choices, chunk=False)
        body["usage"] = _usage(outputs)
        return body


def _prompt_logprobs(output: RequestOutput) -> list[dict[str, Any] | None] | None:
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


class _ChatFormat(_BaseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, created: int, model: str, n: int, top: int) -> None:
        super().__init__(request_id, created, model, n)
        self.top = top

    def start(self, num_prompts: int) -> list[dict[str, Any]]:
        return [
            self._envelope(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                chunk=True,
            )
            for i in range(self.n * num_prompts)
        ]

    def _logprobs(self, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, position in zip(
            completion.token_ids[start:], completion.logprobs[start:], strict=False
        ):
            sampled = position[token_id]
            entry = _token_entry(sampled.decoded_token or "", sampled.logprob)
            ranked = sorted(
                (lp for lp in position.values() if lp.rank is not None and lp.rank <= self.top),
                key=_rank,
            )
            entry["top_logprobs"] = [
                _token_entry(lp.decoded_token or "", lp.logprob) for lp in ranked[: self.top]
            ]
            content.append(entry)
        return {"content": content}

    def _choice_delta(
        self, index: int, completion: CompletionOutput, delta: str, first_token: int
    ) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"content": delta} if delta else {},
            "logprobs": self._logprobs(completion, first_token),
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
        }

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = [
            {
                "index": completion.index,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._logprobs(completion, 0),
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason,
            }
            for output in outputs
            for completion in output.outputs
        ]
        body = self._envelope(choices, chunk=False)
        body["usage"] = _usage(outputs)
        return body


def _rank(logprob: Any) -> int:
    return logprob.rank


__all__ = ["OpenAIError", "OpenAIServing", "PositionLogprobs"]
