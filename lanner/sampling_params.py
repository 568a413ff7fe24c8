"""SamplingParams: how one request wants its tokens chosen and its output shaped, validated."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is greedy: dividing logits by ~0 would overflow.
GREEDY_TEMPERATURE = 1e-5
# Top logprobs per token are copied to the host every step; past 20 that copy (and the
# response) grows with little use, and OpenAI's API caps top_logprobs at 20 as well.
MAX_LOGPROBS = 20
# Each of a request's n samples is a sequence of its own in the engine (a detokenizer,
# blocks, a scheduler entry): past this, one call would build millions of them. For more
# samples of one prompt, pass the prompt several times.
MAX_N = 1024
# Integers travel to the engine core and the device as 64-bit values.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingType(enum.Enum):
    GREEDY = "greedy"  # argmax, no randomness
    RANDOM = "random"  # drawn from the shared default generator
    RANDOM_SEED = "random_seed"  # drawn from a generator seeded by the request


@dataclass(kw_only=True)
class SamplingParams:
    """vLLM's sampling parameters, with its names and defaults.

    ``stop`` and ``stop_token_ids`` accept None or a single value and are always lists
    after construction; ``top_k=-1`` is stored as 0 (off).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) keeps the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs returned besides the sampled token's
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> SamplingParams:
        # The generated __init__ would raise TypeError("unexpected keyword argument"), which
        # the server cannot tell apart from a bug; check names here so both the constructor
        # and from_dict give the same ValueError that lists the valid names.
        _reject_unknown(kwargs.keys())
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON-like mapping (a server request body), rejecting unknown keys."""
        _reject_unknown(values.keys())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def clone(self, **changes: Any) -> SamplingParams:
        """A validated copy with ``changes`` applied; lists are copied, never shared."""
        return dataclasses.replace(self, **changes)

    def child(self, index: int) -> SamplingParams:
        """Params for the ``index``-th of the ``n`` sequences of a fanned-out request.

        Each child samples one sequence. A seeded request gives child i the seed
        ``seed + i``: with one shared seed all n children would draw the same tokens.
        The prompt's logprobs come once, with the first child.
        """
        # A copy, not a re-validated clone: these values are valid by construction, and
        # a request of n samples builds n of them (revalidating cost ~150 us each).
        child = copy.copy(self)
        child.n = 1
        child.seed = None if self.seed is None else _wrap_int64(self.seed + index)
        child.stop = list(self.stop or [])
        child.stop_token_ids = list(self.stop_token_ids or [])
        if index:
            child.prompt_logprobs = None
        return child

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def uses_truncation(self) -> bool:
        """True when top_k, top_p or min_p cut the distribution (ignored when greedy)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    # -- construction helpers ------------------------------------------------------------

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(
                f"n must be an integer in [1, {MAX_N}], got {self.n!r}; for more samples of "
                f"one prompt, pass the prompt several times"
            )
        _check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be an integer: 0 or -1 (off) or >= 1, got {self.top_k!r}")
        _check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number(
            "repetition_penalty", self.repetition_penalty, "> 0 (1 is off)", lambda v: v > 0
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1, none_ok=True)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}: "
                    f"the top logprobs are copied to the host for every token, so lanner "
                    f"caps them at {MAX_LOGPROBS} (as OpenAI's API does)"
                )
        if self.seed is not None and not (
            _is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX
        ):
            raise ValueError(
                f"seed must be None or a 64-bit integer (in [-2**63, 2**63 - 1]), got {self.seed!r}"
            )
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(
                    f"stop must be a non-empty string or a list of non-empty strings, "
                    f"got {stop!r} in {self.stop!r}"
                )
            check_unicode("stop", stop)
        if self.stop and not self.detokenize:
            raise ValueError(
                f"stop strings {self.stop!r} need detokenize=True: lanner finds them in the "
                f"output text; use stop_token_ids to stop on tokens without detokenizing"
            )
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or not 0 <= token_id <= INT64_MAX:
                raise ValueError(
                    f"stop_token_ids must be non-negative 64-bit integers, got {token_id!r} "
                    f"in {self.stop_token_ids!r}"
                )


def _reject_unknown(names: Iterable[str]) -> None:
    valid = SamplingParams.field_names()
    for name in names:
        if name not in valid:
            message = f"unknown sampling parameter {name!r}; valid ones are: {', '.join(valid)}"
            close = difflib.get_close_matches(str(name), valid, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            raise ValueError(message)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but n=True or seed=False is a caller's mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _wrap_int64(value: int) -> int:
    """``value`` wrapped into the signed 64-bit range (seed + i of the last sample)."""
    return (value - INT64_MIN) % 2**64 + INT64_MIN


def _check_int(
    name: str, value: Any, minimum: int, maximum: int = INT64_MAX, none_ok: bool = False
) -> None:
    if not _is_int(value) or not minimum <= value <= maximum:
        bound = f"in [{minimum}, {maximum}]" if maximum < INT64_MAX else f">= {minimum}"
        allowed = f"an integer {bound}" if maximum < INT64_MAX else f"a 64-bit integer {bound}"
        raise ValueError(f"{name} must be {'None or ' if none_ok else ''}{allowed}, got {value!r}")


def check_unicode(name: str, text: str) -> None:
    """Raise ValueError when ``text`` cannot be encoded as UTF-8: JSON's escapes can
    carry a lone surrogate (``"\\ud800"``), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} is not valid Unicode: {text[err.start : err.end]!a} at index {err.start} "
            f"is a lone surrogate; send well-formed UTF-8 text"
        ) from None


def _check_number(name: str, value: Any, allowed: str, in_range: Callable[[float], bool]) -> None:
    # NaN and infinities pass some comparisons (inf >= 0) but no sampling maths wants them.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not in_range(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
