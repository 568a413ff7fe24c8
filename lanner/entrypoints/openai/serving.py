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
from lanner.engine.outputs import RequestOutput
from lanner.entrypoints.http_guards import OpenAIError, bad_request, error_body
from lanner.entrypoints.openai.prepare import PreparedPrompt, PreparedRequest
from lanner.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from lanner.entrypoints.openai.responses import (
    ChatFormat,
    CompletionFormat,
    ResponseFormat,
    ResponseOptions,
)

logger = logging.getLogger(__name__)


# Line breaks to str.splitlines (which httpx's iter_lines and other SSE readers use)
# that json.dumps leaves raw with ensure_ascii=False: escaped, a model's U+2028 cannot
# cut a data line in two (a sampled tiny model wrote one in CI).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> str:
    if isinstance(data, str):
        return f"data: {data}\n\n"
    return f"data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


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


def _log_admitted(request_id: str, prepared: PreparedRequest) -> None:
    # `user` is OpenAI's end-user id, for tracing abuse: it goes to the log with the request.
    logger.debug(
        "admitted %s for user %r: %d sequences, %d prompt tokens",
        request_id,
        prepared.body.user,
        prepared.num_sequences,
        sum(len(p.token_ids) for p in prepared.prompts),
    )


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

    def check_capacity(self, num_sequences: int, user: str | None = None) -> None:
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
            logger.info("at capacity: refused %d sequences for user %r", num_sequences, user)
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
        self.check_capacity(prepared.num_sequences, body.user)
        request_id = body.request_id or f"cmpl-{uuid.uuid4().hex}"
        _log_admitted(request_id, prepared)
        created = int(time.time())
        streams = self._start(
            [(f"{request_id}-{i}", p) for i, p in enumerate(prepared.prompts)], body.priority
        )
        formatter = CompletionFormat(self._options(prepared, request_id, created, body.logprobs))
        if body.stream:
            return self._stream(streams, formatter)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    # -- chat ----------------------------------------------------------------------------

    async def create_chat_completion(
        self, prepared: PreparedRequest, is_disconnected: Callable[[], Any]
    ) -> dict[str, Any] | AsyncIterator[str]:
        body = prepared.body
        assert isinstance(body, ChatCompletionRequest)
        self.check_capacity(prepared.num_sequences, body.user)
        request_id = body.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        _log_admitted(request_id, prepared)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        formatter = ChatFormat(self._options(prepared, request_id, int(time.time()), logprobs))
        streams = self._start([(request_id, prepared.prompts[0])], body.priority)
        if body.stream:
            return self._stream(streams, formatter)
        finals = await self._collect(streams, is_disconnected)
        return formatter.response(finals)

    def _options(
        self, prepared: PreparedRequest, request_id: str, created: int, logprobs: int | None
    ) -> ResponseOptions:
        body = prepared.body
        stream_options = body.stream_options
        return ResponseOptions(
            request_id=request_id,
            created=created,
            model=self.model_name,
            n=body.n,
            echo_texts=tuple(p.echo_text for p in prepared.prompts),
            first_token_texts=tuple(p.first_token_text for p in prepared.prompts),
            echo_only=prepared.echo_only,
            logprobs=logprobs,
            return_token_ids=body.return_token_ids,
            include_usage=bool(stream_options and stream_options.include_usage),
            continuous_usage=bool(stream_options and stream_options.continuous_usage_stats),
            tools=prepared.tools,
        )

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
        self, streams: list[AsyncIterator[RequestOutput]], formatter: ResponseFormat
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            async for index, output in merge_outputs(streams):
                finals[index] = output
                for chunk in formatter.chunks(index, output):
                    yield sse(chunk)
            if formatter.options.include_usage:
                yield sse(formatter.usage_chunk([finals[i] for i in range(len(streams))]))
        except (EngineDeadError, ValueError) as err:
            dead = isinstance(err, EngineDeadError)
            status, kind = (500, "EngineDeadError") if dead else (400, "BadRequestError")
            yield sse(error_body(str(err), kind, None, status))
        except Exception:  # noqa: BLE001 - headers are sent: end the stream cleanly
            logger.exception("a streamed response failed")
            yield sse(error_body("internal server error", "InternalServerError", None, 500))
        yield sse("[DONE]")
