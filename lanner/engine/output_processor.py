"""The engine's front half: prompts in, RequestOutputs out (n fan-out, detokenize, stop strings).

It never touches the engine core itself. ``add_request`` returns the core Requests to
queue and ``process_outputs`` the core request ids to abort, so the same piece serves
the in-process ``LLMEngine`` and the server, whose core runs in another process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lanner.engine.detokenizer import IncrementalDetokenizer, decode_token
from lanner.engine.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from lanner.engine.request import FinishReason, Request
from lanner.model.tokenizer import bad_words_token_ids
from lanner.runner.sampler import TokenLogprobs
from lanner.sampling_params import SamplingParams, check_unicode

if TYPE_CHECKING:
    from lanner.engine.core import EngineCoreOutput

# A prompt: text, or a dict as vLLM takes it ({"prompt": str} or {"prompt_token_ids": [...]}).
PromptType = str | dict[str, Any]


def child_request_id(request_id: str, index: int) -> str:
    """The core's id for sample ``index`` of a request (the core sees one request per sample)."""
    return f"{request_id}#{index}"


def parent_request_id(child_id: str) -> tuple[str, int]:
    parent, _, index = child_id.rpartition("#")
    return parent, int(index)


def check_request_id_and_priority(request_id: Any, priority: Any) -> None:
    """Types the scheduler relies on: a bad one must fail before anything is queued."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a str, got {type(request_id).__name__}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an int, got {priority!r}")


@dataclass
class _Completion:
    """Front-end state of one of a request's n samples."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Text released for streaming: only grows (text held back for a possible stop
    # string or an unfinished character is not in it yet).
    released_text: str = ""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Set from the core's outputs, for the server's metrics.
    scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Core (child) request ids that a stop string ended: the core must drop them.
    core_ids_to_abort: list[str]


class OutputProcessor:
    """Per-request front-end state, keyed by the user's request id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        # Samples of tracked requests not yet finished: each must be a request in the core.
        self.num_unfinished_samples = 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            check_unicode("the prompt", prompt)
            return prompt, self._require_tokenizer("a text prompt").encode(prompt)
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(
                    f"unknown prompt fields {sorted(unknown)}; use 'prompt' or 'prompt_token_ids'"
                )
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids
                ):
                    raise ValueError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if isinstance(prompt.get("prompt"), str):
                return self.tokenize_prompt(prompt["prompt"])
        raise ValueError(
            f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', "
            f"got {type(prompt).__name__}"
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[Request]:
        """Start tracking a validated request; return the core Requests (one per sample)
        that the caller must queue in the core."""
        check_request_id_and_priority(request_id, priority)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.bad_words and params.bad_words_token_ids is None:
            ids = bad_words_token_ids(self._require_tokenizer("bad_words"), params.bad_words)
            params = params.clone(bad_words_token_ids=ids)
        if self.tokenizer is None and params.stop:
            self._require_tokenizer("stop strings")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        state = RequestState(
            request_id,
            prompt,
            prompt_token_ids,
            params,
            [],
            RequestMetrics(arrival),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        requests = []
        for index in range(params.n):
            child_params = params.child(index)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params)
                if params.detokenize and self.tokenizer is not None
                else None
            )
            state.completions.append(
                _Completion(
                    index, detokenizer, logprobs=[] if params.logprobs is not None else None
                )
            )
            requests.append(
                Request(
                    child_request_id(request_id, index),
                    prompt_token_ids,
                    child_params,
                    priority=priority,
                    arrival_time=arrival,
                    prefix_source_id=child_request_id(request_id, 0) if index else None,
                )
            )
        self.states[request_id] = state
        self.num_unfinished_samples += len(requests)
        return requests

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forget these requests; return the core ids the caller must abort."""
        core_ids = []
        for request_id in request_ids:
            state = self.states.pop(request_id, None)
            if state is not None:
                open_ids = [
                    child_request_id(request_id, c.index)
                    for c in state.completions
                    if c.finish_reason is None
                ]
                self.num_unfinished_samples -= len(open_ids)
                core_ids += open_ids
        return core_ids

    def clear(self) -> None:
        """Forget every request (the core that ran them is gone)."""
        self.states.clear()
        self.num_unfinished_samples = 0

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one core step's outputs; returns the (cumulative) output of every
        request they moved. Outputs of requests no longer tracked are ignored (an
        abort crossing a step in flight)."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        now = time.monotonic()
        for out in core_outputs:
            parent_id, index = parent_request_id(out.request_id)
            state = self.states.get(parent_id)
            if state is None:
                continue
            touched[parent_id] = state
            if out.scheduled_time is not None and state.scheduled_time is None:
                state.scheduled_time = out.scheduled_time
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs += [self._position(lp) for lp in out.new_prompt_logprobs]
            completion = state.completions[index]
            if completion.finish_reason is not None:
                continue
            if self._update_completion(completion, out):
                to_abort.append(out.request_id)
            if completion.finish_reason is not None:
                self.num_unfinished_samples -= 1
            if out.new_token_ids and state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
        outputs = []
        for request_id, state in touched.items():
            if state.finished:
                state.metrics.finished_time = now
                del self.states[request_id]
            outputs.append(self.request_output(state))
        return ProcessedOutputs(outputs, to_abort)

    def _update_completion(self, completion: _Completion, out: EngineCoreOutput) -> bool:
        """Apply one core output; True when a stop string ended the sample here, so the
        core must drop it. A stop string inside a run of several new tokens (a verified
        speculative run) ends the sample at the token that completed it, as one token a
        step would have."""
        new_ids = out.new_token_ids
        stopped_here = False
        detokenizer = completion.detokenizer
        if detokenizer is not None:
            text_ids = new_ids
            stopped_by_token = out.finish_reason == FinishReason.STOP and text_ids
            if stopped_by_token and not detokenizer.params.include_stop_str_in_output:
                # Like vLLM: an EOS or stop_token_ids hit stays in token_ids, not the text.
                text_ids = text_ids[:-1]
            before = len(detokenizer.token_ids)
            completion.released_text += detokenizer.add_tokens(text_ids, finished=out.finished)
            if detokenizer.stopped and completion.finish_reason is None:
                new_ids = new_ids[: len(detokenizer.token_ids) - before]
                completion.finish_reason = FinishReason.STOP.value
                completion.stop_reason = detokenizer.stop_reason
                stopped_here = True
        completion.token_ids += new_ids
        if completion.logprobs is not None:
            for logprob in out.new_logprobs[: len(new_ids)]:
                completion.logprobs.append(self._position(logprob))
                completion.cumulative_logprob += logprob.logprob
        if stopped_here:
            return not out.finished
        if out.finished and completion.finish_reason is None:
            completion.finish_reason = FinishReason(out.finish_reason).value
            completion.stop_reason = out.stop_reason
        return False

    def _position(self, logprobs: TokenLogprobs) -> PositionLogprobs:
        position = {
            token: Logprob(value, rank, self._token_text(token))
            for rank, (token, value) in enumerate(logprobs.top, start=1)
        }
        position[logprobs.token_id] = Logprob(
            logprobs.logprob, logprobs.rank, self._token_text(logprobs.token_id)
        )
        return position

    def _token_text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else decode_token(self.tokenizer, token_id)

    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs the tokenizer, which skip_tokenizer_init=True left unloaded; "
                f"pass prompts as {{'prompt_token_ids': [...]}} and use stop_token_ids"
            )
        return self.tokenizer

    def request_output(self, state: RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=c.index,
                text=c.detokenizer.text if c.detokenizer is not None else "",
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                released_text=c.released_text,
            )
            for c in state.completions
        ]
        state.metrics.num_output_tokens = max(len(c.token_ids) for c in state.completions)
        state.metrics.scheduled_time = state.scheduled_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs else None,
            outputs=completions,
            finished=state.finished,
            metrics=state.metrics,
        )
