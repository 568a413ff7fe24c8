"""A request's state inside the engine core: its tokens, progress and outcome."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lanner.runner.sampler import TokenLogprobs
from lanner.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lanner.engine.structured_output import RequestGrammar
from lanner.spec.policy import RequestSpecState

# Stands in an output list for a token sampled by a launched step whose result the
# host has not read yet (overlapped scheduling); replaced once the step is collected.
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context limit
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``n > 1`` prompts become n requests that share
    the prompt's KV blocks (see ``prefix_source_id``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first, as in vLLM
    arrival_time: float = field(default_factory=time.monotonic)
    # A sibling of the same prompt whose computed prompt blocks this request may share.
    prefix_source_id: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    scheduled_time: float | None = None  # first time the scheduler ran it
    scheduled_time_sent: bool = False  # reported in an EngineCoreOutput yet?
    # Trailing entries of output_token_ids that are still PLACEHOLDER_TOKEN.
    num_pending_outputs: int = 0
    # Speculative decoding's per-request state (None when speculation is off).
    spec_state: RequestSpecState | None = None
    # Structured outputs: the request's grammar (compiling, then its matcher), or None.
    grammar: RequestGrammar | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: everything whose K/V the cache must hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus the outputs the host has read (placeholders excluded)."""
        return self.num_tokens - self.num_pending_outputs

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]
