"""The messages between a front end and an engine core process, as msgspec types (msgpack).

Only the server imports this module (the offline engine runs without msgspec).
"""

from __future__ import annotations

from typing import Any

import msgspec

from lanner.engine.core import EngineCoreOutput, EngineCoreStats

# -- front end -> core ------------------------------------------------------------------


class AddRequests(msgspec.Struct, tag="add"):
    """Core requests to queue together (one prompt's n samples): all or none."""

    requests: list[dict[str, Any]]  # Request fields; sampling_params as SamplingParams.to_dict()


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class ResetPrefixCache(msgspec.Struct, tag="reset_prefix_cache"):
    pass


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ClientMessage = AddRequests | AbortRequests | ResetPrefixCache | Shutdown

# -- core -> front end ------------------------------------------------------------------


class CoreReady(msgspec.Struct, tag="ready"):
    model_path: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    model_max_len: int  # the model's max_position_embeddings
    eos_token_ids: list[int]


class CoreOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: EngineCoreStats


class RequestRejected(msgspec.Struct, tag="rejected"):
    """An AddRequests the core refused (the front end validates first, so rare)."""

    request_ids: list[str]
    message: str


class ResetPrefixCacheDone(msgspec.Struct, tag="reset_done"):
    emptied: bool


class CoreFailed(msgspec.Struct, tag="failed"):
    """The core hit an error it cannot go on after; it exits next."""

    message: str


CoreMessage = CoreReady | CoreOutputs | RequestRejected | ResetPrefixCacheDone | CoreFailed
