"""A tensor-parallel worker: one rank other than 0, in its own process (a child process
under the mp executor, a Ray actor under ray). It joins the process group, loads its
slice of the model, then runs what rank 0 sends it: each step in lock-step with rank 0
(``ModelRunner.follow``), cache sizing and graph capture at start-up, shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import Any

import torch

from lanner.distributed import TensorParallelGroup, TensorParallelShard, join_store
from lanner.memory.kv_cache import CacheConfig, kv_cache_torch_dtype, num_blocks_for_memory
from lanner.model.loader import load_model
from lanner.runner.model_runner import ModelRunner
from lanner.runner.step_message import STEP, decode_command, decode_step, encode_command

logger = logging.getLogger(__name__)

# How often an idle worker looks up from its connection (it exits when rank 0 is gone).
IDLE_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its slice of the engine's model."""

    world_size: int
    load_options: dict[str, Any]  # load_model's keyword arguments (model, dtype, ...)
    cache: CacheConfig = field(default_factory=CacheConfig)
    enforce_eager: bool = False
    timeout_s: float = 300.0  # a collective's timeout


@dataclass(frozen=True)
class Rendezvous:
    """Where a worker finds rank 0: its control listener and its TCPStore."""

    control_address: tuple[str, int]
    authkey: bytes
    store_host: str
    store_port: int
    # This worker's address as the other ranks reach it (gloo binds to it).
    hostname: str = "127.0.0.1"


def set_no_delay(connection: Connection) -> None:
    """Small step messages leave at once (Nagle's algorithm would hold them for an ACK)."""
    with socket.socket(fileno=os.dup(connection.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def worker_device(spec: WorkerSpec, rank: int) -> torch.device:
    """A worker's device: the local GPU of its rank (Ray gives each actor one GPU, which
    it sees as cuda:0), or the CPU."""
    device = spec.load_options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda"):
        return torch.device("cpu")
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def run_worker(spec: WorkerSpec, rank: int, rendezvous: Rendezvous) -> None:
    """A worker's whole life; returns when rank 0 says shutdown or goes away."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = worker_device(spec, rank)
    if device.type == "cpu":
        # Every rank shares the host's cores: each takes its share, not all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    connection = Client(rendezvous.control_address, authkey=rendezvous.authkey)
    set_no_delay(connection)
    try:
        connection.send_bytes(encode_command("hello", rank, os.getpid()))
        runner = _start(spec, rank, rendezvous, device)
        connection.send_bytes(encode_command("ready", rank))
        _serve(runner, spec, connection)
    except (EOFError, ConnectionError, BrokenPipeError):
        logger.info("tensor-parallel worker %d: rank 0 is gone; exiting", rank)
    except Exception as err:  # noqa: BLE001 - reported to rank 0, which fails the engine
        logger.error("tensor-parallel worker %d failed:\n%s", rank, traceback.format_exc())
        with contextlib.suppress(OSError):
            connection.send_bytes(encode_command("failed", rank, f"{type(err).__name__}: {err}"))
        raise
    finally:
        connection.close()


def _start(
    spec: WorkerSpec, rank: int, rendezvous: Rendezvous, device: torch.device
) -> ModelRunner:
    shard = TensorParallelShard(rank, spec.world_size)
    store = join_store(rendezvous.store_host, rendezvous.store_port, spec.world_size)
    group = TensorParallelGroup(store, shard, device, spec.timeout_s, rendezvous.hostname)
    options = {**spec.load_options, "device": device}
    loaded = load_model(**options, shard=shard, group=group)
    cache_dtype = kv_cache_torch_dtype(spec.cache.kv_cache_dtype, loaded.dtype)
    return ModelRunner(loaded, spec.cache.block_size, cache_dtype, spec.enforce_eager)


def _serve(runner: ModelRunner, spec: WorkerSpec, connection: Connection) -> None:
    while True:
        if not connection.poll(IDLE_POLL_S):
            continue
        message = connection.recv_bytes()
        if message.startswith(STEP):
            runner.follow(decode_step(message))
            continue
        name, args = decode_command(message)
        if name == "shutdown":
            return
        if name == "profile":
            num_tokens, num_seqs, max_model_len, num_speculative_tokens, useful_blocks = args
            peak = runner.profile_peak_memory(
                num_tokens, num_seqs, max_model_len, num_speculative_tokens
            )
            blocks = num_blocks_for_memory(
                spec.cache,
                runner.config,
                runner.cache_dtype,
                runner.device,
                peak,
                useful_blocks,
                num_kv_heads=runner.num_kv_heads,
            )
            connection.send_bytes(encode_command("num_blocks", blocks))
        elif name == "initialize_cache":
            runner.initialize_cache(*args)
            connection.send_bytes(encode_command("cache_ready"))
        else:
            raise ValueError(f"tensor-parallel worker: unknown command {name!r}")
