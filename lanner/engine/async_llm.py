"""AsyncLLM: the server's engine. Tokenizing, detokenizing and output assembly run here,
in the API process, on asyncio; the engine core runs in its own process, so HTTP load
never stalls the device loop.

Only the server imports this module (it needs pyzmq and msgspec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCoreStats, validate_prompt
from lanner.engine.core_client import AsyncCoreClient, EngineDeadError
from lanner.engine.core_messages import (
    CoreFailed,
    CoreOutputs,
    CoreReady,
    RequestRejected,
    ResetPrefixCache,
    ResetPrefixCacheDone,
)
from lanner.engine.llm_engine import checked_generation_defaults
from lanner.engine.output_processor import OutputProcessor, parent_request_id
from lanner.engine.outputs import RequestOutput
from lanner.model.tokenizer import load_tokenizer
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "StatLogger"]


class StatLogger(Protocol):
    """What the engine reports as it runs (the server's Prometheus metrics)."""

    def on_core_stats(self, stats: EngineCoreStats) -> None: ...

    def on_new_tokens(self, num_tokens: int, inter_token_latency: float | None) -> None: ...

    def on_request_finished(self, output: RequestOutput) -> None: ...


class RequestStream:
    """The outputs of one request, as an async iterator. Closing it before the end, or
    dropping it unread, aborts the request (even if it was never iterated)."""

    def __init__(
        self, engine: AsyncLLM, request_id: str, queue: asyncio.Queue[RequestOutput | Exception]
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        # Outputs are cumulative: when several piled up, the newest says it all.
        while not self._queue.empty() and not isinstance(item, Exception):
            item = self._queue.get_nowait()
        if isinstance(item, Exception):
            self.close(abort=False)
            raise item
        if item.finished:
            self.close(abort=False)
        return item

    def close(self, abort: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._queues.pop(self.request_id, None)
        if abort:
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            with contextlib.suppress(Exception):
                self.close()


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig,
        stat_logger: StatLogger | None = None,
        core_env: dict[str, str] | None = None,
        client: AsyncCoreClient | None = None,
    ) -> None:
        """``core_env``: variables the core process starts with (a data-parallel rank's
        GPU); ``client``: a core client already launched for ``config`` (see launch)."""
        self.config = config
        self.stat_logger = stat_logger
        self.client = client or AsyncCoreClient(config, env=core_env)
        self.ready: CoreReady | None = None
        self.tokenizer: Any = None
        self.processor: OutputProcessor | None = None
        # SamplingParams fields the model's generation_config.json sets (once started).
        self.generation_defaults: dict[str, Any] = {}
        self.stats = EngineCoreStats()
        self.dead_error: EngineDeadError | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._token_counts: dict[str, int] = {}  # output tokens seen per request
        self._last_token_time: dict[str, float] = {}
        self._reset_waiters: list[asyncio.Future[bool]] = []
        self._output_task: asyncio.Task[None] | None = None

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        # A tokenizer in a local folder loads on a thread while the engine core's process
        # builds (they share no GIL; up to 6 s through transformers, H200 host); one from
        # the Hub once the core has resolved the model's folder.
        load = self.config.load
        source = load.local_tokenizer_dir()
        early = (
            asyncio.create_task(asyncio.to_thread(load_tokenizer, source, load.trust_remote_code))
            if source is not None
            else None
        )
        try:
            self.ready = await self.client.start()
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        self.tokenizer = (
            await early
            if early is not None
            else await asyncio.to_thread(
                load_tokenizer, load.tokenizer or self.ready.model_path, load.trust_remote_code
            )
        )
        self.generation_defaults = checked_generation_defaults(
            self.ready.model_path, self.config.load.generation_config
        )
        self.processor = OutputProcessor(self.tokenizer)
        self._output_task = asyncio.create_task(self._output_loop(), name="lanner-outputs")

    async def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
            await asyncio.gather(self._output_task, return_exceptions=True)
        await asyncio.to_thread(self.client.shutdown)

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None or not self.client.alive

    @property
    def max_model_len(self) -> int:
        assert self.ready is not None
        return self.ready.max_model_len

    @property
    def num_unfinished_requests(self) -> int:
        assert self.processor is not None
        return len(self.processor.states)

    @property
    def num_unfinished_sequences(self) -> int:
        """Samples of unfinished requests (n each): what the engine holds or will."""
        assert self.processor is not None
        return self.processor.num_unfinished_samples

    # -- requests ------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        assert self.ready is not None
        ready = self.ready
        validate_prompt(
            prompt_token_ids, ready.max_model_len, ready.vocab_size, ready.model_max_len
        )

    def generate(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Queue one request now (bad input raises here, before anything is queued) and
        return the iterator of its cumulative outputs. Outputs that pile up while the
        consumer is busy are merged: only the newest is yielded. Closing the iterator
        before the end (a client that went away) aborts the request."""
        if self.dead_error is not None:
            raise self.dead_error
        if not self.client.alive:
            raise EngineDeadError("the engine core process is not running")
        assert self.processor is not None
        self.validate_prompt(prompt_token_ids)
        requests = self.processor.add_request(
            request_id, prompt, prompt_token_ids, params, priority, arrival_time
        )
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            self.client.add_requests(requests)
        except BaseException:
            self._queues.pop(request_id, None)
            self.processor.abort_requests([request_id])
            raise
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV cache (no-op when it already ended)."""
        self._token_counts.pop(request_id, None)
        self._last_token_time.pop(request_id, None)
        if self.processor is None:
            return
        state = self.processor.states.get(request_id)
        core_ids = self.processor.abort_requests([request_id])
        if state is not None and self.stat_logger is not None:
            output = self.processor.request_output(state)
            for completion in output.outputs:
                completion.finish_reason = completion.finish_reason or "abort"
            output.metrics.finished_time = time.monotonic()
            self.stat_logger.on_request_finished(output)
        if core_ids and self.dead_error is None:
            try:
                self.client.abort_requests(core_ids)
            except Exception:  # noqa: BLE001 - the core is gone; nothing holds KV any more
                logger.debug("abort of %s not delivered", request_id)

    async def reset_prefix_cache(self) -> bool:
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._reset_waiters.append(waiter)
        self.client.send(ResetPrefixCache())
        return await waiter

    # -- the core's outputs --------------------------------------------------------------

    async def _output_loop(self) -> None:
        try:
            while True:
                message = await self.client.receive()
                if isinstance(message, CoreOutputs):
                    self._on_outputs(message)
                elif isinstance(message, RequestRejected):
                    for core_id in message.request_ids:
                        parent, _ = parent_request_id(core_id)
                        self.processor.abort_requests([parent])  # type: ignore[union-attr]
                        queue = self._queues.get(parent)
                        if queue is not None:
                            queue.put_nowait(ValueError(message.message))
                elif isinstance(message, ResetPrefixCacheDone):
                    while self._reset_waiters:
                        self._reset_waiters.pop(0).set_result(message.emptied)
                elif isinstance(message, CoreFailed):
                    raise EngineDeadError(f"the engine core failed: {message.message}")
        except asyncio.CancelledError:
            raise
        except EngineDeadError as err:
            self._fail(err)
        except Exception as err:  # noqa: BLE001 - a bug here must not hang every request
            logger.exception("output loop failed")
            self._fail(EngineDeadError(f"the engine's output loop failed: {err}"))

    def _on_outputs(self, message: CoreOutputs) -> None:
        assert self.processor is not None
        self.stats = message.stats
        if self.stat_logger is not None:
            self.stat_logger.on_core_stats(message.stats)
        processed = self.processor.process_outputs(message.outputs)
        if processed.core_ids_to_abort:
            self.client.abort_requests(processed.core_ids_to_abort)
        now = time.monotonic()
        for output in processed.request_outputs:
            request_id = output.request_id
            if self.stat_logger is not None:
                count = sum(len(c.token_ids) for c in output.outputs)
                new = count - self._token_counts.get(request_id, 0)
                if new > 0:
                    last = self._last_token_time.get(request_id)
                    self.stat_logger.on_new_tokens(new, None if last is None else now - last)
                    self._token_counts[request_id] = count
                    self._last_token_time[request_id] = now
                if output.finished:
                    self.stat_logger.on_request_finished(output)
            if output.finished:
                self._token_counts.pop(request_id, None)
                self._last_token_time.pop(request_id, None)
                # The consumer holds the queue; the map need not (it may never read).
                queue = self._queues.pop(request_id, None)
            else:
                queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _fail(self, err: EngineDeadError) -> None:
        logger.error("%s; failing %d in-flight requests", err, len(self._queues))
        self.dead_error = err
        for queue in self._queues.values():
            queue.put_nowait(err)
        if self.processor is not None:
            self.processor.clear()
        for waiter in self._reset_waiters:
            if not waiter.done():
                waiter.set_exception(err)
        self._reset_waiters.clear()
