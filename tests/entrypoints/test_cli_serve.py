"""`lanner serve` takes every engine option of LLM as a vLLM-spelled flag."""

from __future__ import annotations

import dataclasses

from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig, LoadConfig
from lanner.entrypoints.cli import build_parser, engine_kwargs
from lanner.memory.kv_cache import CacheConfig


def engine_option_names() -> set[str]:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"load", "cache"}
    names |= {f.name for f in dataclasses.fields(LoadConfig)}
    names |= {f.name for f in dataclasses.fields(CacheConfig)}
    return names


def test_every_engine_option_is_a_serve_flag() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    missing = {name for name in engine_option_names() if f"--{name.replace('_', '-')}" not in flags}
    assert not missing


def test_serve_defaults_to_the_demo_model_and_maps_flags() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.model_tag is None and args.model == str(DEFAULT_MODEL_DIR)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = build_parser().parse_args(
        ["serve", "some/model", "--max-model-len", "64", "--no-enable-prefix-caching",
         "--enforce-eager", "--max-queued-requests", "3", "--api-key", "k"]
    )  # fmt: skip
    args.model = args.model_tag
    options = engine_kwargs(args)
    assert options == {
        "model": "some/model",
        "max_model_len": 64,
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }
    EngineConfig.from_kwargs(**options)  # every name is one the engine takes
    assert (args.max_queued_requests, args.api_key) == (3, "k")
