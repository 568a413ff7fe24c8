"""Triton RMSNorm and residual-add + RMSNorm over the last dim, for inputs of any leading shape."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lanner.kernels.pdl import launch_options, pdl_start

# The whole row lives in registers; wider rows would spill badly (no model has one).
MAX_ROW_LENGTH = 65536

# Triton's CPU interpreter truncates fp32 -> bf16 casts, where the GPU (and torch) round to
# nearest even; under the interpreter the kernels round by hand so that tests can hold them
# to the reference within one bf16 ulp.
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def cast_rounded(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even on the GPU and under the interpreter alike."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# num_rows only bounds the row mask: not specializing it (on 1, on multiples of 16) keeps
# one binary for every batch (a cold start compiled 6 variants of this kernel, now 2).
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    summed_ptr,
    num_rows,
    row_length,
    inner_rows,
    x_stride_outer,
    x_stride_inner,
    residual_stride_outer,
    residual_stride_inner,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    # Row r of the flattened input sits at (r // inner_rows) * stride_outer +
    # (r % inner_rows) * stride_inner: this covers contiguous inputs (inner_rows == 1)
    # and [tokens, heads, head_dim] views cut out of a wider qkv tensor.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < row_length
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    outer = rows // inner_rows
    inner = rows % inner_rows
    x_offsets = (outer * x_stride_outer + inner * x_stride_inner)[:, None] + cols[None, :]
    out_offsets = (rows * row_length)[:, None] + cols[None, :]

    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_offsets = (outer * residual_stride_outer + inner * residual_stride_inner)[
            :, None
        ] + cols[None, :]
        residual = tl.load(residual_ptr + residual_offsets, mask=mask, other=0.0)
        # The sum is rounded to its storage dtype before it is normalized, as in the reference.
        x = cast_rounded(x.to(tl.float32) + residual.to(tl.float32), summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + out_offsets, x, mask=mask)

    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=1) / row_length
    inverse_rms = 1.0 / tl.sqrt(mean_square + eps)
    # Normalize in fp32, round to the input dtype, then scale by the weight (HF Llama order).
    normed = cast_rounded(x32 * inverse_rms[:, None], x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = weight[None, :] * normed
    tl.store(out_ptr + out_offsets, cast_rounded(out, out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _launch_config(row_length: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): short rows (qk-norm's head_dim) are packed
    several to a program so each program moves a few KiB."""
    block_cols = triton.next_power_of_2(row_length)
    block_rows = max(1, 2048 // block_cols)
    elements = block_rows * block_cols
    num_warps = min(16, max(1, elements // 512))
    return block_rows, block_cols, num_warps


def _leading_layout(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Collapse leading dims shared by several tensors into at most two (outer, inner).

    Returns (num_rows, inner_rows, [(stride_outer, stride_inner) per tensor]), or None
    when more than two dims stay uncollapsible (the caller then copies).
    """
    dims: list[tuple[int, list[int]]] = []
    for index, size in enumerate(shape):
        if size == 1:
            continue
        these = [tensor_strides[index] for tensor_strides in strides]
        if dims and all(
            outer == size * inner for outer, inner in zip(dims[-1][1], these, strict=True)
        ):
            dims[-1] = (dims[-1][0] * size, these)
        else:
            dims.append((size, these))
    if len(dims) > 2:
        return None
    if not dims:
        return 1, 1, [(0, 0) for _ in strides]
    if len(dims) == 1:
        return dims[0][0], 1, [(stride, 0) for stride in dims[0][1]]
    (outer_size, outer_strides), (inner_size, inner_strides) = dims
    layout = list(zip(outer_strides, inner_strides, strict=True))
    return outer_size * inner_size, inner_size, layout


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    row_length = x.shape[-1]
    if weight.shape != (row_length,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({row_length},)")
    if row_length > MAX_ROW_LENGTH:
        raise ValueError(f"rows of {row_length} exceed the supported {MAX_ROW_LENGTH}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    tensors = [x] if residual is None else [x, residual]
    layout = _leading_layout(tuple(x.shape[:-1]), [t.stride()[:-1] for t in tensors])
    if layout is None:
        tensors = [t.contiguous() for t in tensors]
        x = tensors[0]
        residual = tensors[1] if residual is not None else None
        layout = _leading_layout(tuple(x.shape[:-1]), [t.stride()[:-1] for t in tensors])
        assert layout is not None
    num_rows, inner_rows, strides = layout

    summed_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(
        x.shape, dtype=torch.promote_types(weight.dtype, summed_dtype), device=x.device
    )
    summed = None if residual is None else torch.empty(x.shape, dtype=summed_dtype, device=x.device)
    if x.numel() == 0:
        return out, summed

    block_rows, block_cols, num_warps = _launch_config(row_length)
    x_strides = strides[0]
    residual_strides = strides[1] if residual is not None else (0, 0)
    grid = (triton.cdiv(num_rows, block_rows),)
    _rms_norm_kernel[grid](
        x,
        residual if residual is not None else x,
        weight,
        out,
        summed if summed is not None else out,
        num_rows,
        row_length,
        inner_rows,
        x_strides[0],
        x_strides[1],
        residual_strides[0],
        residual_strides[1],
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
        **launch_options(x),
    )
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape, strided views allowed).

    Same rounding as ``reference.rms_norm``: normalize in fp32, cast to ``x.dtype``, then
    multiply by ``weight``. Returns a new contiguous tensor of ``x``'s shape.
    """
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the inputs are not modified."""
    out, summed = _launch(x, residual, weight, eps)
    assert summed is not None
    return out, summed
