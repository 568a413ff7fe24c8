"""The engine core in its own process: a busy loop fed and drained over ZMQ.

It receives add/abort/reset/shutdown messages, runs ``EngineCore.step()`` whenever
there is work, and sends each step's outputs (with the core's load) back. A fatal
error is reported before exiting, and the loop exits when its parent process dies.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback

import msgspec
import zmq

from lanner.engine.config import EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.core_messages import (
    AbortRequests,
    AddRequests,
    ClientMessage,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    RequestRejected,
    ResetPrefixCache,
    ResetPrefixCacheDone,
    Shutdown,
)
from lanner.engine.request import Request
from lanner.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long an idle core waits for a message before checking that its parent lives.
IDLE_POLL_MS = 200


def request_from_dict(fields: dict) -> Request:
    fields = dict(fields)
    fields["sampling_params"] = SamplingParams.from_dict(fields["sampling_params"])
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
    return Request(**fields)


def run_engine_core(
    config: EngineConfig, input_address: str, output_address: str, parent_pid: int
) -> None:
    """Process entry point (spawned): build the core, then serve until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The level `lanner --log-level` chose (the CLI exports it for its child processes).
    level = os.environ.get("LANNER_LOGGING_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    # No high-water mark: a send never blocks, so an orphaned core still reaches its
    # check of the parent (a blocked send to a dead reader would wait forever).
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.setsockopt(zmq.LINGER, 2000)
    outputs.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(config)
        outputs.send(
            encoder.encode(
                CoreReady(
                    model_path=str(core.loaded.path),
                    max_model_len=core.max_model_len,
                    vocab_size=core.model_config.vocab_size,
                    num_kv_blocks=core.num_kv_blocks,
                    model_max_len=core.model_config.max_position_embeddings,
                    eos_token_ids=list(core.model_config.eos_token_ids),
                )
            )
        )
        _busy_loop(core, inputs, outputs, encoder, parent_pid)
    except Exception as err:  # noqa: BLE001 - reported to the front end, then exit
        logger.error("engine core failed:\n%s", traceback.format_exc())
        outputs.send(encoder.encode(CoreFailed(f"{type(err).__name__}: {err}")))
    finally:
        inputs.close(linger=0)
        outputs.close()
        context.term()


def _busy_loop(
    core: EngineCore,
    inputs: zmq.Socket,
    outputs: zmq.Socket,
    encoder: msgspec.msgpack.Encoder,
    parent_pid: int,
) -> None:
    decoder = msgspec.msgpack.Decoder(ClientMessage)
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    while True:
        # Idle: block (briefly, to notice an orphaning). Busy: only take what is there.
        timeout = 0 if core.has_unfinished_requests() else IDLE_POLL_MS
        changed = False
        while poller.poll(timeout):
            message = decoder.decode(inputs.recv())
            if isinstance(message, Shutdown):
                core.shutdown()
                return
            changed = True
            _handle(core, message, outputs, encoder)
            timeout = 0
        if os.getppid() != parent_pid:
            logger.warning("engine core: the front end process is gone; exiting")
            return
        core.check_workers()  # a lost tensor-parallel worker fails the core, even idle
        if core.has_unfinished_requests():
            step_outputs = core.step()
            if step_outputs or changed:
                outputs.send(encoder.encode(CoreOutputs(step_outputs, core.stats())))
        elif changed:  # e.g. aborts: the gauges must show the drop
            outputs.send(encoder.encode(CoreOutputs([], core.stats())))


def _handle(
    core: EngineCore,
    message: ClientMessage,
    outputs: zmq.Socket,
    encoder: msgspec.msgpack.Encoder,
) -> None:
    if isinstance(message, AddRequests):
        requests = []
        try:
            requests = [request_from_dict(fields) for fields in message.requests]
            core.add_requests(requests)
        except (ValueError, TypeError) as err:
            ids = [fields.get("request_id", "") for fields in message.requests]
            outputs.send(encoder.encode(RequestRejected(ids, str(err))))
    elif isinstance(message, AbortRequests):
        core.abort_requests(message.request_ids)
    elif isinstance(message, ResetPrefixCache):
        outputs.send(encoder.encode(ResetPrefixCacheDone(core.reset_prefix_cache())))
