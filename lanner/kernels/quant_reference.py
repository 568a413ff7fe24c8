"""Pure-torch references of the quantized linears: per-token activation quantization, the
W8A8 matmul (fp8 or int8 weights and activations), the W8A16 matmul (the same weights,
activations as they are: skinny_matmul_w8's variant without x_qmax) and the W4A16 matmul (grouped
4-bit weights), plus lanner's packed int4 layout that the Triton kernels read.

The packed int4 layout ("planes"): a weight [N, K] of 4-bit codes q (0..15) is padded along
K to a multiple of INT4_TILE (512) and stored as 16-bit words, 128 a tile, in an int32
tensor [N, K_padded / 8] (two words an int32, the lower word first). Within each tile, word
p (0..127) holds in its nibble s (bits 4s..4s+3) the code of k = tile_start + 128 s + p:
nibble plane s of a [rows, P]-word block holds the codes of P consecutive k, so a kernel
turns a pair of words into a pair of 16-bit floats with one shift and one mask, straight in
the layout the tensor cores read (kernels/weight_codes.py). The real value is
(q - zero[group, n]) * scale[group, n] with groups of `group_size` consecutive k (16, 32,
64, 128 or a multiple of 128, so that no plane of 128 straddles two groups unevenly);
scales and zeros are stored [K_groups, N] (groups major, so one group's row of N is
contiguous), zeros as uint8 (codes 0..15) or absent for symmetric weights (zero = 8).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
# Codes per packed int4 tile, and the k of one nibble plane of it (its 16-bit words).
INT4_TILE = 512
INT4_PLANE = 128
INT4_SYMMETRIC_ZERO = 8


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, qmax: float, row_absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: each row of x [M, K] gets the scale absmax / qmax
    (float32) and x / scale rounded to ``dtype`` (float8 e4m3: round to nearest even,
    saturating at +-448; int8: round half to even, clamped to [-128, 127]). A row of zeros
    gets scale 1. ``row_absmax`` [M] (float32), when given, is used as each row's absmax:
    a row-parallel rank holds a slice of each row and quantizes it by the whole row's.
    Returns (codes [M, K], scales [M] float32)."""
    rows = x.float()
    absmax = rows.abs().amax(dim=-1) if row_absmax is None else row_absmax
    scales = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = rows / scales[:, None]
    if dtype == FP8_DTYPE:
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    elif dtype == torch.int8:
        codes = scaled.round().clamp(-128, 127).to(torch.int8)
    else:
        raise ValueError(f"quantize_rows: dtype must be float8_e4m3fn or int8, not {dtype}")
    return codes, scales


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_qmax: float,
    compute_dtype: torch.dtype = torch.float32,
    row_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = dequant(quantize_rows(x, row_absmax)) @ dequant(weight).T + bias, in
    ``compute_dtype``, returned in x's dtype. weight [N, K] is fp8 or int8 with per-channel
    weight_scale [N]; ``row_absmax`` [rows of x]: see quantize_rows."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    codes, scales = quantize_rows(rows, weight.dtype, x_qmax, row_absmax)
    x_dq = codes.to(compute_dtype) * scales.to(compute_dtype)[:, None]
    w_dq = weight.to(compute_dtype) * weight_scale.to(compute_dtype)[:, None]
    out = x_dq @ w_dq.T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row of x [..., K], float32 [rows] (exact: no rounding in it)."""
    return torch.linalg.vector_norm(
        x.reshape(-1, x.shape[-1]), ord=float("inf"), dim=-1, dtype=torch.float32
    )


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = x @ dequant(weight).T + bias with x as it is (no activation rounding), in
    ``compute_dtype``, returned in x's dtype: the W8A16 product of an fp8 or int8 weight
    [N, K] with per-channel weight_scale [N]."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).to(compute_dtype)
    out = rows @ weight.to(compute_dtype).T * weight_scale.to(compute_dtype)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (integers 0..15, any integer dtype) -> the plane layout, int32
    [N, ceil(K / 512) * 64]; K is padded with code 0."""
    n, k = codes.shape
    padded_k = -(-k // INT4_TILE) * INT4_TILE
    values = torch.zeros(n, padded_k, dtype=torch.int32, device=codes.device)
    values[:, :k] = codes.to(torch.int32)
    # [N, tiles, 4 (plane s), 128 (word p)]: k = tile * 512 + 128 s + p
    values = values.view(n, padded_k // INT4_TILE, 4, INT4_PLANE)
    shifts = (4 * torch.arange(4, device=codes.device, dtype=torch.int32)).view(1, 1, 4, 1)
    words = (values << shifts).sum(dim=2)  # disjoint bits: the sum is an OR; < 2^16
    # Two's complement: words >= 2^15 become negative int16 with the same bits.
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
    return words.reshape(n, -1).view(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The plane layout int32 [N, words / 2] -> codes uint8 [N, k]."""
    n = packed.shape[0]
    words = packed.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    words = words.view(n, -1, 1, INT4_PLANE)
    shifts = (4 * torch.arange(4, device=packed.device, dtype=torch.int32)).view(1, 1, 4, 1)
    codes = (words >> shifts) & 0xF  # [N, tiles, 4, 128]
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real weights [N, k] in ``dtype`` of the plane layout: (q - zero) * scale with the
    scale (and zero) of each k's group, computed in ``dtype`` (q - zero is exact in any
    float dtype, so each weight is rounded once, after the scale's own cast)."""
    codes = unpack_int4(packed, k).to(dtype)
    group_of_k = torch.arange(k, device=packed.device) // group_size
    scale = scales.to(dtype)[group_of_k].T  # [N, k]
    zero = INT4_SYMMETRIC_ZERO if zeros is None else zeros.to(dtype)[group_of_k].T
    return (codes - zero) * scale


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    perm: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x[..., perm] @ dequantize_int4(...).T + bias, in ``compute_dtype``, returned in
    x's dtype. ``perm`` (act-order checkpoints) is the input order the packed rows follow.
    ``weight_dtype`` (default compute_dtype) is the dtype the weights are dequantized in:
    the decode rows' kernel applies the scales in fp32, exactly; the batched paths (the
    tiled kernel, dequantize + cuBLAS) round each weight once to the model dtype."""
    if perm is not None:
        x = x.index_select(-1, perm)
    k = x.shape[-1]
    weight = dequantize_int4(packed, scales, zeros, group_size, k, weight_dtype or compute_dtype)
    out = x.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype)
