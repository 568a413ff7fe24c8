"""The server's bounds on what one request may ask for: named, with defaults and flags.

Every bound exists because something grows with it on the server: n builds a sequence
per sample, stop strings are searched in every new piece of text, a body is parsed whole,
and a prompt is tokenized whole. Each is checked before the work it bounds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from lanner.sampling_params import MAX_LOGPROBS

MiB = 1 << 20
# The event loop builds each sequence of a request when it admits it (a detokenizer, the
# engine's request, its message to the core): ~0.15 ms each on the 2-core CPU machine,
# so 256 sequences hold the loop ~40 ms, and the engine's own 1024 would hold it ~250 ms.
MAX_N_CEILING = 256


@dataclass(frozen=True)
class ServerLimits:
    # Sequences one request may ask for: n, times the prompts of a batched completion.
    # OpenAI's API caps n at 128.
    max_n: int = 128
    # Top logprobs per token (vLLM's --max-logprobs); at most the engine's MAX_LOGPROBS.
    max_logprobs: int = MAX_LOGPROBS
    # Stop strings per request and characters per stop string.
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024
    # stop_token_ids per request (each step checks the newest token against them).
    max_stop_token_ids: int = 1024
    # Bytes of one request body, read before anything parses it.
    max_request_body_bytes: int = 16 * MiB
    # Characters of prompt text (or chat messages) before tokenizing. None: the most
    # that could fit the context, max_model_len x the longest token's characters, so no
    # prompt that fits is refused.
    max_prompt_chars: int | None = None
    # Seconds one request's parsing, chat-template rendering and tokenizing may take.
    prepare_timeout_s: float = 10.0
    # Worker processes that prepare requests (parse, render, tokenize).
    prepare_workers: int = 2
    # Whether a request may bring its own chat template (vLLM's
    # --trust-request-chat-template): a template is a program run on the server.
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_n",
            "max_stop_strings",
            "max_stop_string_chars",
            "max_stop_token_ids",
            "prepare_workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.max_n <= MAX_N_CEILING:
            raise ValueError(
                f"--max-n must be in [1, {MAX_N_CEILING}], got {self.max_n}: admitting a "
                f"request builds each of its sequences on the event loop; for more samples "
                f"of a prompt, send it in several requests"
            )
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"--max-logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}"
            )
        if self.max_request_body_bytes < 1024:
            raise ValueError(
                f"--max-request-body-bytes must be >= 1024, got {self.max_request_body_bytes}"
            )
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"--max-prompt-chars must be >= 1, got {self.max_prompt_chars}")
        if not self.prepare_timeout_s > 0:
            raise ValueError(f"--prepare-timeout must be > 0, got {self.prepare_timeout_s}")


_HELP = {
    "max_n": "most sequences one request may ask for (n, times the number of prompts)",
    "max_logprobs": "most top logprobs per token (logprobs, top_logprobs, prompt_logprobs)",
    "max_stop_strings": "most stop strings per request",
    "max_stop_string_chars": "most characters in one stop string",
    "max_stop_token_ids": "most stop_token_ids per request",
    "max_request_body_bytes": "largest request body in bytes; larger ones get 413",
    "max_prompt_chars": "most prompt (or chat message) characters before tokenizing "
    "(default: max_model_len x the longest token's characters)",
    "prepare_timeout_s": "seconds one request's parsing, chat-template rendering and "
    "tokenizing may take; longer ones get 400",
    "prepare_workers": "worker processes that parse, render and tokenize requests",
    "trust_request_chat_template": "let requests bring their own chat_template (it runs in a "
    "sandboxed worker under the time budget)",
}


def _flag(name: str) -> str:
    return "prepare-timeout" if name == "prepare_timeout_s" else name.replace("_", "-")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    for field in fields(ServerLimits):
        flag = f"--{_flag(field.name)}"
        if field.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=_HELP[field.name])
        else:
            kind = float if field.name == "prepare_timeout_s" else int
            help_text = _HELP[field.name]
            if field.default is not None:
                help_text += f" (default {field.default})"
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The limits the flags set; unset flags keep their defaults."""
    given = {
        field.name: getattr(args, _flag(field.name).replace("-", "_"))
        for field in fields(ServerLimits)
    }
    return ServerLimits(**{name: value for name, value in given.items() if value is not None})
