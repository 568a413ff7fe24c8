"""Process groups and the collectives tensor parallelism runs over them (torch.distributed:
NCCL on CUDA, gloo on the CPU). Nothing above this package talks to NCCL directly."""

from lanner.distributed.group import (
    TensorParallelGroup,
    TensorParallelShard,
    host_store,
    join_store,
)

__all__ = ["TensorParallelGroup", "TensorParallelShard", "host_store", "join_store"]
