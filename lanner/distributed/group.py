"""A tensor-parallel process group: each rank's place in it, and the collectives the model
and the runner use (all-reduce of sums or maxima, all-gather, broadcast), on NCCL for CUDA
tensors and gloo for CPU ones.

The group is built from torch's c10d backends directly (``ProcessGroupNCCL`` /
``ProcessGroupGloo`` over a TCPStore), not through ``init_process_group``: the global
default group would allow one tensor-parallel engine per process, and a process that
already uses torch.distributed for its own purposes would clash with it. Every collective
has the group's timeout, so none waits forever on a rank that is gone.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallelShard:
    """Which slice of the model one rank holds: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"tensor-parallel rank {self.rank} is outside 0..{self.world_size - 1}"
            )

    def kv_head_slice(self, num_kv_heads: int) -> tuple[int, int]:
        """(slice index, number of slices) of the KV heads this rank holds: its own
        ``num_kv_heads / world_size`` heads, or, with fewer KV heads than ranks, the one
        head its query heads read (each head then lives on ``world_size / num_kv_heads``
        ranks)."""
        if num_kv_heads >= self.world_size:
            return self.rank, self.world_size
        return self.rank * num_kv_heads // self.world_size, num_kv_heads

    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        return max(1, num_kv_heads // self.world_size)


# How long ranks may take to meet: processes start, import torch and connect (slow on a
# loaded host) before the group exists; afterwards each collective has the group's timeout.
RENDEZVOUS_TIMEOUT_S = 600.0


def host_store(host: str, world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, on a free port of ``host`` (``store.port`` says which)."""
    return dist.TCPStore(
        host,
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
        wait_for_workers=False,
    )


def join_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
    )


class TensorParallelGroup:
    """The ranks of one tensor-parallel model, and their collectives on ``device``'s
    backend (NCCL for CUDA, gloo for the CPU)."""

    def __init__(
        self,
        store: dist.Store,
        shard: TensorParallelShard,
        device: torch.device,
        timeout_s: float,
        hostname: str = "127.0.0.1",
        name: str = "tp",
    ) -> None:
        self.shard = shard
        self.rank = shard.rank
        self.world_size = shard.world_size
        self.device = device
        # Meeting the other ranks may take long; a collective afterwards takes timeout_s.
        timeout = datetime.timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S))
        prefixed = dist.PrefixStore(name, store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.backend: dist.Backend = dist.ProcessGroupNCCL(
                prefixed, self.rank, self.world_size, options
            )
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            # The interface that reaches the other ranks (a node's address under Ray).
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
            self.backend = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size, options)
        self._max_options = dist.AllreduceOptions()
        self._max_options.reduceOp = dist.ReduceOp.MAX
        # NCCL creates its communicator at the first collective, which must not happen
        # inside a CUDA graph capture: make it now (and check every rank is there).
        probe = torch.ones(1, device=device)
        self.all_reduce(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if int(probe.item()) != self.world_size:
            raise RuntimeError(f"tensor-parallel group probe summed to {probe.item()}")
        if hasattr(self.backend, "_set_default_timeout"):
            self.backend._set_default_timeout(datetime.timedelta(seconds=timeout_s))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        self.backend.allreduce([tensor]).wait()
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise max of ``tensor`` over the ranks, in place; returns it."""
        self.backend.allreduce([tensor], self._max_options).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` [rows, cols] side by side: [rows, world_size * cols]."""
        rows, cols = tensor.shape
        tensor = tensor.contiguous()
        if self.device.type == "cuda":
            # One NCCL collective into one buffer (capturable in a CUDA graph).
            gathered = torch.empty(
                (self.world_size, rows, cols), dtype=tensor.dtype, device=tensor.device
            )
            self.backend._allgather_base(gathered, tensor).wait()
        else:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self.backend.allgather([parts], [tensor]).wait()
            gathered = torch.stack(parts)
        return gathered.permute(1, 0, 2).reshape(rows, self.world_size * cols)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
        self.backend.broadcast(tensor, src).wait()
        return tensor

    def abort(self) -> None:
        """Tear the communicators down, so a collective stuck on a lost rank returns (with
        an error) instead of waiting out its timeout."""
        try:
            self.backend.abort()
        except Exception as err:  # noqa: BLE001 - best effort while failing anyway
            logger.debug("aborting the tensor-parallel group: %s", err)
