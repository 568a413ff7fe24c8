"""LLMEngine: the engine core and the output processor (the front half) in one process.
The offline LLM drives it step by step."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCore, validate_token_ids
from lanner.engine.output_processor import (
    OutputProcessor,
    PromptType,
    check_request_id_and_priority,
    child_request_id,
)
from lanner.engine.outputs import RequestOutput
from lanner.engine.structured_output import validate_structured_outputs
from lanner.model.config import generation_sampling_defaults
from lanner.model.tokenizer import load_tokenizer
from lanner.sampling_params import SamplingParams

__all__ = ["LLMEngine", "PromptType"]


def checked_generation_defaults(model_dir: Any, source: str) -> dict[str, Any]:
    """The sampling defaults of a model's generation config, checked as SamplingParams
    checks them (a bad file fails at start, naming itself, not in every request)."""
    defaults = generation_sampling_defaults(model_dir, source)
    try:
        SamplingParams(**defaults)
    except ValueError as err:
        where = "generation_config.json" if source == "auto" else source
        raise ValueError(
            f"the model's {where} sets sampling defaults SamplingParams refuses: {err}; fix "
            f"the file or pass generation_config='vllm' to ignore it"
        ) from None
    return defaults


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        load = config.load
        # A tokenizer in a local folder loads on a thread while the engine core builds, one
        # not yet remembered built by a child process (importing transformers and building
        # it took 5.6 s of Python on the H200's host, which on a thread here held the GIL
        # the build needs); one from the Hub once the core has resolved the model's folder.
        source = None if load.skip_tokenizer_init else load.local_tokenizer_dir()
        early: Future | None = None
        if source is not None:
            loader = ThreadPoolExecutor(1, "tokenizer-load")
            early = loader.submit(load_tokenizer, source, load.trust_remote_code, True)
            loader.shutdown(wait=False)
        self.core = EngineCore(config)
        self.tokenizer = (
            None
            if load.skip_tokenizer_init
            else early.result()
            if early is not None
            else load_tokenizer(load.tokenizer or self.core.loaded.path, load.trust_remote_code)
        )
        # The SamplingParams fields the model's generation_config.json sets.
        self.generation_defaults = checked_generation_defaults(
            self.core.loaded.path, config.load.generation_config
        )
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished_requests()

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.processor.tokenize_prompt(prompt)

    def validate_request(
        self, request_id: Any, prompt: PromptType, params: Any, priority: Any = 0
    ) -> tuple[str | None, list[int]]:
        """Check everything add_request would, queueing nothing; returns the tokenized
        prompt. Raises ValueError saying what to change."""
        check_request_id_and_priority(request_id, priority)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, prompt_ids = self.tokenize_prompt(prompt)
        self.core.validate_prompt(prompt_ids)
        validate_token_ids(params, self.core.model_config.vocab_size)
        if params.structured_outputs is not None:
            validate_structured_outputs(params.structured_outputs)
        return text, prompt_ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; on bad input raise ValueError and queue nothing."""
        text, prompt_ids = self.validate_request(request_id, prompt, params, priority)
        requests = self.processor.add_request(request_id, text, prompt_ids, params, priority)
        try:
            self.core.add_requests(requests)
        except BaseException:
            self.processor.abort_requests([request_id])
            raise

    def reset_prefix_cache(self) -> bool:
        """Drop every cached KV block no request uses; True when the cache ended empty."""
        return self.core.reset_prefix_cache()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort one request id, or several."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        core_ids = self.processor.abort_requests(request_ids)
        if core_ids:
            self.core.abort_requests(core_ids)

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the (cumulative) output of every request it moved."""
        processed = self.processor.process_outputs(self.core.step())
        if processed.core_ids_to_abort:
            self.core.abort_requests(processed.core_ids_to_abort)
        self._check_core_knows_requests()
        return processed.request_outputs

    def _check_core_knows_requests(self) -> None:
        """Every sample the front end still waits on must be in the core; one that is not
        would never finish, and the caller's loop would spin forever."""
        known = self.core.scheduler.requests
        if self.processor.num_unfinished_samples <= len(known):
            return  # the usual case, in O(1); the scan below runs only on a mismatch
        waiting_on = {
            child_request_id(request_id, c.index): request_id
            for request_id, state in self.processor.states.items()
            for c in state.completions
            if c.finish_reason is None
        }
        lost = sorted({parent for child, parent in waiting_on.items() if child not in known})
        if not lost:
            return
        self.abort_request(lost)
        raise RuntimeError(
            f"requests {lost[:10]} are unknown to the engine core (aborted or lost there "
            f"without passing through LLMEngine.abort_request); they were dropped"
        )
