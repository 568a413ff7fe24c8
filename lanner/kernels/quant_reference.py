"""Pure-torch references of the quantized linears: per-token activation quantization, the
W8A8 matmul (fp8 or int8 weights and activations) and the W4A16 matmul (grouped 4-bit
weights), plus lanner's packed int4 layout that the Triton kernels read.

The packed int4 layout ("chunked"): a weight [N, K] of 4-bit codes q (0..15) is padded along
K to a multiple of INT4_CHUNK (128) and stored as int32 words [N, K_padded / 8]. Within each
chunk of 128 consecutive k, word j (0..15) holds in its nibble s (bits 4s..4s+3) the code of
k = chunk_start + 16 s + j. A kernel that shifts a [rows, 16]-word tile right by 4 s gets the
codes of 16 consecutive k, which is a tl.dot operand as it stands (no reshape). The real
value is (q - zero[group, n]) * scale[group, n] with groups of `group_size` consecutive k;
scales and zeros are stored [K_groups, N] (groups major, so one group's row of N is
contiguous), zeros as uint8 (codes 0..15) or absent for symmetric weights (zero = 8).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
# Codes per packed int4 chunk, and its words (int32 holds 8 codes).
INT4_CHUNK = 128
INT4_CHUNK_WORDS = INT4_CHUNK // 8
INT4_SYMMETRIC_ZERO = 8


def quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, qmax: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: each row of x [M, K] gets the scale absmax / qmax
    (float32) and x / scale rounded to ``dtype`` (float8 e4m3: round to nearest even,
    saturating at +-448; int8: round half to even, clamped to [-128, 127]). A row of zeros
    gets scale 1. Returns (codes [M, K], scales [M] float32)."""
    rows = x.float()
    absmax = rows.abs().amax(dim=-1)
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
) -> torch.Tensor:
    """y = dequant(quantize_rows(x)) @ dequant(weight).T + bias, in ``compute_dtype``,
    returned in x's dtype. weight [N, K] is fp8 or int8 with per-channel weight_scale [N]."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    codes, scales = quantize_rows(rows, weight.dtype, x_qmax)
    x_dq = codes.to(compute_dtype) * scales.to(compute_dtype)[:, None]
    w_dq = weight.to(compute_dtype) * weight_scale.to(compute_dtype)[:, None]
    out = x_dq @ w_dq.T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (integers 0..15, any integer dtype) -> the chunked layout, int32
    [N, ceil(K / 128) * 16]; K is padded with code 0."""
    n, k = codes.shape
    padded_k = -(-k // INT4_CHUNK) * INT4_CHUNK
    values = torch.zeros(n, padded_k, dtype=torch.int64, device=codes.device)
    values[:, :k] = codes.to(torch.int64)
    # [N, chunks, 8 (nibble s), 16 (word j)]: k = chunk * 128 + 16 s + j
    values = values.view(n, padded_k // INT4_CHUNK, 8, INT4_CHUNK_WORDS)
    shifts = (4 * torch.arange(8, device=codes.device, dtype=torch.int64)).view(1, 1, 8, 1)
    words = (values << shifts).sum(dim=2)  # disjoint bits: the sum is an OR
    # Two's complement: words >= 2^31 become negative int32 with the same bits.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).reshape(n, -1)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The chunked layout int32 [N, words] -> codes uint8 [N, k]."""
    n, num_words = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(n, num_words // INT4_CHUNK_WORDS, 1, INT4_CHUNK_WORDS)
    shifts = (4 * torch.arange(8, device=packed.device, dtype=torch.int64)).view(1, 1, 8, 1)
    codes = (words >> shifts) & 0xF  # [N, chunks, 8, 16]
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real weights [N, k] in ``dtype`` of the chunked int4 layout: (q - zero) * scale with
    the scale (and zero) of each k's group, computed in ``dtype``."""
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
) -> torch.Tensor:
    """y = x[..., perm] @ dequantize_int4(...).T + bias, in ``compute_dtype``, returned in
    x's dtype. ``perm`` (act-order checkpoints) is the input order the packed rows follow."""
    if perm is not None:
        x = x.index_select(-1, perm)
    k = x.shape[-1]
    weight = dequantize_int4(packed, scales, zeros, group_size, k, compute_dtype)
    out = x.to(compute_dtype) @ weight.T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype)
