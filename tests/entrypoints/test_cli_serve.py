"""`lanner serve` takes every engine option of LLM as a vLLM-spelled flag."""

from __future__ import annotations

import dataclasses

import pytest

from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig, LoadConfig
from lanner.entrypoints.cli import build_parser, engine_kwargs
from lanner.memory.kv_cache import CacheConfig
from lanner.runner.executor import ParallelConfig


def engine_option_names() -> set[str]:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"load", "cache", "parallel"}
    names |= {f.name for f in dataclasses.fields(LoadConfig)}
    names |= {f.name for f in dataclasses.fields(CacheConfig)}
    names |= {f.name for f in dataclasses.fields(ParallelConfig)}
    return names


def test_every_engine_option_is_a_serve_flag() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    missing = {name for name in engine_option_names() if f"--{name.replace('_', '-')}" not in flags}
    assert not missing


def test_serve_defaults_to_the_demo_model_and_maps_flags() -> None:
    args = build_parser().parse_args(["serve"])
    assert engine_kwargs(args)["model"] == str(DEFAULT_MODEL_DIR)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = build_parser().parse_args(
        ["serve", "some/model", "--max-model-len", "64", "--no-enable-prefix-caching",
         "--enforce-eager", "--max-queued-requests", "3", "--api-key", "k"]
    )  # fmt: skip
    options = engine_kwargs(args)
    assert options == {
        "model": "some/model",
        "max_model_len": 64,
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }
    EngineConfig.from_kwargs(**options)  # every name is one the engine takes
    assert (args.max_queued_requests, args.api_key) == (3, "k")


def test_limit_flags_become_server_limits() -> None:
    from lanner.entrypoints.openai.limits import ServerLimits, limits_from_args

    args = build_parser().parse_args(["serve"])
    assert limits_from_args(args) == ServerLimits()
    args = build_parser().parse_args(
        ["serve", "--max-n", "4", "--max-logprobs", "5", "--max-request-body-bytes", "4096",
         "--prepare-timeout", "0.5", "--trust-request-chat-template", "--max-prompt-chars", "99"]
    )  # fmt: skip
    limits = limits_from_args(args)
    assert (limits.max_n, limits.max_logprobs, limits.max_request_body_bytes) == (4, 5, 4096)
    assert (limits.prepare_timeout_s, limits.max_prompt_chars) == (0.5, 99)
    assert limits.trust_request_chat_template
    for flags, words in (
        (["--max-n", "0"], "--max-n"),
        (["--max-n", "1000"], "several requests"),
        (["--max-logprobs", "21"], "--max-logprobs"),
        (["--prepare-timeout", "0"], "--prepare-timeout"),
        (["--max-request-body-bytes", "10"], "--max-request-body-bytes"),
    ):
        with pytest.raises(ValueError, match=words):
            limits_from_args(build_parser().parse_args(["serve", *flags]))
