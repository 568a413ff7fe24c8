"""LLMEngine: the engine core plus its front half (tokenize, fan out n, detokenize, stop
strings, output assembly), in one process. The offline LLM drives it step by step."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCore, EngineCoreOutput
from lanner.engine.detokenizer import IncrementalDetokenizer, decode_token
from lanner.engine.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from lanner.engine.request import FinishReason, Request
from lanner.model.tokenizer import load_tokenizer
from lanner.runner.sampler import TokenLogprobs
from lanner.sampling_params import SamplingParams

# A prompt: text, or a dict as vLLM takes it ({"prompt": str} or {"prompt_token_ids": [...]}).
PromptType = str | dict[str, Any]


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


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


def _child_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(
            config.load.tokenizer or self.core.loaded.path, config.load.trust_remote_code
        )
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self._states)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(
                    f"unknown prompt fields {sorted(unknown)}; use 'prompt' or 'prompt_token_ids'"
                )
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
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
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; on bad input raise ValueError and queue nothing."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.tokenize_prompt(prompt)
        self.core.validate_prompt(prompt_ids)
        arrival = time.monotonic()
        state = _RequestState(
            request_id,
            text,
            prompt_ids,
            params,
            [],
            RequestMetrics(arrival),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        for index in range(params.n):
            child_params = params.child(index)
            if index:  # the prompt's logprobs come once, from the first sample
                child_params = child_params.clone(prompt_logprobs=None)
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params)
                if params.detokenize
                else None
            )
            state.completions.append(
                _Completion(
                    index, detokenizer, logprobs=[] if params.logprobs is not None else None
                )
            )
            self.core.add_request(
                Request(
                    _child_id(request_id, index),
                    prompt_ids,
                    child_params,
                    priority=priority,
                    arrival_time=arrival,
                    prefix_source_id=_child_id(request_id, 0) if index else None,
                )
            )
        self._states[request_id] = state

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block no request uses; True when the cache ended empty."""
        return self.core.reset_prefix_cache()

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is not None:
                self.core.abort_requests(
                    [_child_id(request_id, c.index) for c in state.completions]
                )

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the (cumulative) output of every request it moved."""
        touched: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        core_outputs = self.core.step()
        now = time.monotonic()
        for out in core_outputs:
            parent_id, _, index = out.request_id.rpartition("#")
            state = self._states[parent_id]
            touched[parent_id] = state
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs += [self._position(lp) for lp in out.new_prompt_logprobs]
            if self._update_completion(state.completions[int(index)], out):
                to_abort.append(out.request_id)
            if out.new_token_ids and state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
        if to_abort:
            self.core.abort_requests(to_abort)
        outputs = []
        for request_id, state in touched.items():
            if state.finished:
                state.metrics.finished_time = now
                del self._states[request_id]
            outputs.append(self._request_output(state))
        return outputs

    def _update_completion(self, completion: _Completion, out: EngineCoreOutput) -> bool:
        """Apply one core output; True when a stop string ended the sample here, so the
        core must drop it."""
        completion.token_ids += out.new_token_ids
        if completion.logprobs is not None:
            for logprob in out.new_logprobs:
                completion.logprobs.append(self._position(logprob))
                completion.cumulative_logprob += logprob.logprob
        detokenizer = completion.detokenizer
        if detokenizer is not None and out.new_token_ids:
            detokenizer.add_tokens(out.new_token_ids)
            if detokenizer.stopped and completion.finish_reason is None:
                completion.finish_reason = FinishReason.STOP.value
                completion.stop_reason = detokenizer.stop_reason
                return not out.finished
        if out.finished and completion.finish_reason is None:
            completion.finish_reason = out.finish_reason.value  # type: ignore[union-attr]
            completion.stop_reason = out.stop_reason
        return False

    def _position(self, logprobs: TokenLogprobs) -> PositionLogprobs:
        position = {
            token: Logprob(value, rank, decode_token(self.tokenizer, token))
            for rank, (token, value) in enumerate(logprobs.top, start=1)
        }
        position[logprobs.token_id] = Logprob(
            logprobs.logprob, logprobs.rank, decode_token(self.tokenizer, logprobs.token_id)
        )
        return position

    def _request_output(self, state: _RequestState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=c.index,
                text=c.detokenizer.text if c.detokenizer is not None else "",
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in state.completions
        ]
        state.metrics.num_output_tokens = max(len(c.token_ids) for c in state.completions)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs else None,
            outputs=completions,
            finished=state.finished,
            metrics=state.metrics,
        )
