"""SpeculativeConfig: which proposer guesses tokens, how many, and when speculation is off."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Methods that run a checkpoint (speculative_config.model) beside the target.
MODEL_METHODS = ("draft_model", "eagle", "eagle3")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``, spelled as vLLM spells it.

    ``num_speculative_tokens`` is the most tokens proposed per request and step. The
    n-gram proposer matches the last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens
    against the request's earlier tokens; ``draft_model`` runs the checkpoint ``model``
    (same vocabulary as the target) beside it, in the target's block tables; ``eagle``
    and ``eagle3`` run the EAGLE draft head ``model`` (EAGLE-1/2 or EAGLE-3 layout) on
    the target's hidden states (see ``lanner.spec.eagle``).

    When speculation does not pay it is off: with ``disable_by_batch_size`` running
    requests or more, no request speculates; with ``adaptive_draft_length`` each step's
    draft length (0 to num_speculative_tokens) is the one with the most tokens per second
    at that batch size, from the measured times of its steps and the requests' recent
    acceptance (see ``lanner.spec.policy``); without it every step drafts
    num_speculative_tokens.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"  # the draft's dtype; "auto": the target's
    disable_by_batch_size: int | None = None
    adaptive_draft_length: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config.method {self.method!r} is unknown; use one of "
                f"{list(SPECULATIVE_METHODS)}"
            )
        k = self.num_speculative_tokens
        if not _is_int(k) or k < 1:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer >= 1, got {k!r}"
            )
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            # vLLM: either bound alone sets both.
            lo = hi if lo is None else lo
            hi = lo if hi is None else hi
            lo, hi = (2 if lo is None else lo), (5 if hi is None else hi)
            for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not _is_int(value) or value < 1:
                    raise ValueError(
                        f"speculative_config.{name} must be an integer >= 1, got {value!r}"
                    )
            if lo > hi:
                raise ValueError(
                    f"speculative_config.prompt_lookup_min ({lo}) must be <= "
                    f"prompt_lookup_max ({hi})"
                )
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
            if self.model is not None:
                raise ValueError(
                    f"speculative_config.model is for methods {list(MODEL_METHODS)}; n-gram "
                    "lookup needs no model (drop model, or set method to 'draft_model')"
                )
        else:
            if not isinstance(self.model, str) or not self.model:
                what = (
                    "a checkpoint folder or Hub id sharing the target's vocabulary"
                    if self.method == "draft_model"
                    else "an EAGLE head's folder or Hub id, trained for the target"
                )
                raise ValueError(
                    f"speculative_config.model is required for method {self.method!r}: {what}"
                )
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name} is only for method 'ngram'")
        size = self.disable_by_batch_size
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(
                f"speculative_config.disable_by_batch_size must be None or an integer >= 1, "
                f"got {size!r}"
            )
        if not isinstance(self.adaptive_draft_length, bool):
            raise ValueError(
                f"speculative_config.adaptive_draft_length must be true or false, got "
                f"{self.adaptive_draft_length!r}"
            )

    @classmethod
    def from_value(
        cls, value: SpeculativeConfig | Mapping[str, Any] | None
    ) -> SpeculativeConfig | None:
        """Accept a config, a dict (as ``LLM(speculative_config={...})`` and the CLI's JSON
        give it) or None; unknown keys fail with the list of valid ones."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"speculative_config must be a dict such as {{'method': 'ngram', "
                f"'num_speculative_tokens': 3}}, got {type(value).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown speculative_config field(s) {unknown}; valid ones are: {valid}"
            )
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config.{required} is required")
        return cls(**value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
