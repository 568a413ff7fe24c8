"""Triton SiLU-and-multiply: silu(gate) * up on a [..., 2 * d] input holding gate then up."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start
from lanner.kernels.rms_norm import cast_rounded


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    width,
    x_stride_row,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    # Rows on grid axis 0 (up to 2**31 - 1 of them), column blocks on axis 1.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x_row = x_ptr + row * x_stride_row
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    # silu in fp32, rounded to the input dtype, then the product rounded again: the same
    # rounding points as F.silu(gate) * up in the input dtype.
    out_dtype = out_ptr.dtype.element_ty
    activated = cast_rounded(gate / (1.0 + tl.exp(-gate)), out_dtype).to(tl.float32)
    tl.store(out_ptr + row * width + cols, cast_rounded(activated * up, out_dtype), mask=mask)


@functools.cache
def _launch_config(width: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(width), 1024)
    return block, max(1, min(4, block // 256))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2 * d]; returns a new [..., d] tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim {x.shape[-1]} of silu_and_mul's input must be even")
    width = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, 2 * width)  # a view unless the leading dims cannot be merged
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    block, num_warps = _launch_config(width)
    grid = (rows.shape[0], triton.cdiv(width, block))
    _silu_and_mul_kernel[grid](
        rows, out, width, rows.stride(0), BLOCK=block, num_warps=num_warps, **launch_options(x)
    )
    return out
