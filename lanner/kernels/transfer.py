"""Host lists to device tensors without stalling the host: a copy from pinned memory,
queued on the stream. (A copy from ordinary memory waits for the device to finish all
queued work first, which would undo overlapped scheduling.)"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return tensor_to_device(torch.tensor(values, dtype=dtype), device)


def tensor_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor's copy on ``device``, queued (through pinned memory on CUDA)."""
    if torch.device(device).type == "cuda":
        # The caching host allocator keeps the pinned block alive until the copy is done.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
