"""Triton kernel for the sampler's per-row random draws: Exp(1) noise from a per-row seed,
so a batch of seeded requests costs one launch instead of one generator per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lanner.kernels.transfer import to_device


@triton.jit
def _exponential_noise_kernel(out_ptr, seeds_ptr, vocab_size, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row)
    uniform = tl.rand(seed, columns)  # Philox, counter = column: independent of the batch
    # -log(u) ~ Exp(1); keep u away from 0 so the noise stays finite.
    noise = -tl.log(tl.maximum(uniform, 1.0e-20))
    tl.store(out_ptr + row * stride_row + columns, noise, mask=columns < vocab_size)


def exponential_noise(seeds: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(seeds), vocab_size] float32 Exp(1) draws; row i is a pure function of seeds[i]."""
    seed_tensor = to_device(seeds, torch.int64, device)
    out = torch.empty((len(seeds), vocab_size), dtype=torch.float32, device=device)
    block = 1024
    _exponential_noise_kernel[(len(seeds), triton.cdiv(vocab_size, block))](
        out, seed_tensor, vocab_size, out.stride(0), BLOCK=block, num_warps=4
    )
    return out
