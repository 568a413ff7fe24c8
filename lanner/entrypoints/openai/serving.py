"""The OpenAI endpoints' logic: a prepared request (prepare.py) is admitted and queued in
the engine, and its outputs become OpenAI responses or server-sent-event streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from lanner.engine.async_llm import AsyncLLM, EngineDeadError
from lanner.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from lanner.entrypoints.openai.errors import OpenAIError, bad_request, error_body
from lanner.entrypoints.openai.prepare import PreparedPrompt, PreparedRequest
from lanner.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


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

    def check_capacity(self, num_sequences: int) -> None:
        """Admission counts sequences (each prompt's n samples), not requests: the
        queue cap bounds what the engine will hold."""
        if self.engine.is_dead:
            raise OpenAIError(
                503, "the engine core is not running; restart the server", "EngineDeadError"
            )
        if self.max_queued_requests is None:
            return
        # Sequences beyond what one batch runs wait in the queue; past the cap, refuse.
        limit = self.max_num_seqs + self.max_queued_requests
        if num_sequences > limit:
            raise bad_request(
                f"this request asks for {num_sequences} sequences (n per prompt), more than "
                f"this server ever holds at once ({limit}: --max-num-seqs plus "
                f"--max-queued-requests); lower n or send fewer prompts",
                "n",
            )
        in_flight = self.engine.num_unfinished_sequences
        if in_flight + num_sequences > limit:
            raise OpenAIError(
                429,
                f"the server is at capacity ({in_flight} sequences in flight, at most "
                f"{self.max_queued_requests} may wait beyond a full batch); retry later",
                "RateLimitError",
                headers={"Retry-After": "1"},
            )

    # -- completions ---------------------------------------------------------------------

    async def create_completion(
        self, prepared: PreparedRequest, is_disconnected: Callable[[], Any]
    ) -> dict[str, Any] | AsyncIterator[str]:
        body = prepared.body
        assert isinstance(body, CompletionRequest)
        self.check_capacity(prepared.num_sequences)
        request_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = self._start(
            [(f"{request_id}-{i}", p) for i, p in enumerate(prepared.prompts)], body.priority
        )
        formatter = _CompletionFormat(request_id, created, self.model_name, body.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(streams, formatter, include_usage)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    # -- chat ----------------------------------------------------------------------------

    async def create_chat_completion(
        self, prepared: PreparedRequest, is_disconnected: Callable[[], Any]
    ) -> dict[str, Any] | AsyncIterator[str]:
        body = prepared.body
        assert isinstance(body, ChatCompletionRequest)
        self.check_capacity(prepared.num_sequences)
        request_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        formatter = _ChatFormat(
            request_id, int(time.time()), self.model_name, body.n, body.top_logprobs or 0
        )
        streams = self._start([(request_id, prepared.prompts[0])], body.priority)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(streams, formatter, include_usage)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    # -- shared --------------------------------------------------------------------------

    def _start(
        self, requests: list[tuple[str, PreparedPrompt]], priority: int
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue every request now (all or none), so errors become HTTP errors and the
        load check counts them at once."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, prompt in requests:
                streams.append(
                    self.engine.generate(
                        request_id, prompt.text, prompt.token_ids, prompt.params, priority
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
            dead = isinstance(err, EngineDeadError)
            status, kind = (500, "EngineDeadError") if dead else (400, "BadRequestError")
            yield sse(error_body(str(err), kind, None, status))
        except Exception:  # noqa: BLE001 - headers are sent: end the stream cleanly
            logger.exception("a streamed response failed")
            yield sse(error_body("internal server error", "InternalServerError", None, 500))
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
