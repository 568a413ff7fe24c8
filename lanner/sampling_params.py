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


@dataclass(kw_only=True)
class StructuredOutputsParams:
    """One constraint on a request's output (vLLM's spelling; exactly one field set):
    ``json`` a JSON schema (dict or its text), ``json_object`` any JSON object, ``regex`` a
    regular expression the whole output matches, ``choice`` one of these strings, or
    ``grammar`` an EBNF grammar (xgrammar's dialect, ``root ::= ...``)."""

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # JSON without free whitespace between tokens (vLLM's disable_any_whitespace).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name)]
        if self.json_object:
            chosen.append("json_object")
        if len(chosen) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of json, json_object, regex, choice or "
                f"grammar, got {chosen or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, str | dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema, got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"structured_outputs.{name} must be a string, got {value!r}")
                check_unicode(f"structured_outputs.{name}", value)
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"structured_outputs.choice must be a list of non-empty strings, got "
                f"{self.choice!r}"
            )

    @property
    def kind(self) -> str:
        """Which constraint: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(n for n in ("json", "regex", "choice", "grammar") if getattr(self, n))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SamplingType(enum.Enum):
    GREEDY = "greedy"  # argmax, no randomness
    RANDOM = "random"  # drawn from the shared default generator
    RANDOM_SEED = "random_seed"  # drawn from a generator seeded by the request


@dataclass(kw_only=True)
class SamplingParams:
    """vLLM's sampling parameters, with its names and defaults.

    ``stop`` and ``stop_token_ids`` accept None or a single value and are always lists
    after construction; ``top_k=-1`` is stored as 0 (off). ``bad_words`` become token
    sequences (``bad_words_token_ids``) when the engine's front end takes the request.
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
    # token id -> a number added to its logit before sampling (OpenAI's: in [-100, 100])
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # when set, only these may be sampled
    bad_words: list[str] | None = None  # text the output must never contain as tokens
    # bad_words as token sequences (the front end fills it); a sequence's last token is
    # barred whenever the output ends with the ones before it.
    bad_words_token_ids: list[list[int]] | None = None
    # The output follows a JSON schema, regex, choice or grammar (xgrammar).
    structured_outputs: StructuredOutputsParams | None = None

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
        values = {name: getattr(self, name) for name in self.field_names()}
        if self.structured_outputs is not None:
            values["structured_outputs"] = self.structured_outputs.to_dict()
        return values

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
    def uses_token_constraints(self) -> bool:
        """logit_bias, allowed_token_ids or bad words change this row's logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def uses_output_history(self) -> bool:
        """The logits' processing reads earlier outputs (penalties, multi-token bad words,
        a grammar's state), so a step cannot be launched before the previous one's tokens
        are known."""
        return (
            self.uses_penalties
            or self.structured_outputs is not None
            or any(len(w) > 1 for w in self.bad_words_token_ids or [])
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
        if isinstance(self.structured_outputs, Mapping):  # from a message or a JSON body
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

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
        self._validate_token_constraints()
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or not 0 <= token_id <= INT64_MAX:
                raise ValueError(
                    f"stop_token_ids must be non-negative 64-bit integers, got {token_id!r} "
                    f"in {self.stop_token_ids!r}"
                )

    def _validate_token_constraints(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                )
            for token_id, bias in self.logit_bias.items():
                if not _is_token_id(token_id):
                    raise ValueError(
                        f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}"
                    )
                _check_number(
                    f"logit_bias[{token_id}]", bias, "in [-100, 100]", lambda v: -100 <= v <= 100
                )
        if self.allowed_token_ids is not None:
            _check_token_ids("allowed_token_ids", self.allowed_token_ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {words!r}")
            for word in words:
                check_unicode("bad_words", word)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                f"structured_outputs must be StructuredOutputsParams, got "
                f"{type(self.structured_outputs).__name__}"
            )
        if self.bad_words_token_ids is not None:
            if not isinstance(self.bad_words_token_ids, list):
                raise ValueError(
                    f"bad_words_token_ids must be a list of token id lists, got "
                    f"{self.bad_words_token_ids!r}"
                )
            for sequence in self.bad_words_token_ids:
                _check_token_ids("bad_words_token_ids", sequence)


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= INT64_MAX


def _check_token_ids(name: str, ids: Any) -> None:
    if not isinstance(ids, list) or not ids or not all(_is_token_id(t) for t in ids):
        raise ValueError(
            f"{name} must be a non-empty list of token ids (integers >= 0), got {ids!r}"
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
