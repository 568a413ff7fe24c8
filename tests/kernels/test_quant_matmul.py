"""The quantized matmul kernels (W4A16: int4 codes with group scales and zero points;
W8A8: fp8 or int8 weights with per-token activation quantization) against a float64
dequantize-then-matmul reference, in Triton's CPU interpreter: odd N and K (K not a
multiple of the 128-code chunk, shorter than one), every group size the kernels take,
zero points or none, 1-16 rows (the skinny path, with split-K) and larger M (the tiled
path), bias, act-order, and bitwise batch invariance of the decode rows."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import quant_reference as ref  # noqa: E402
from lanner.kernels import w4a16_matmul as w4a16  # noqa: E402
from lanner.kernels import w8a8_matmul as w8a8  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402

skip_unless_interpreted(w4a16._w4a16_matmul_kernel)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
F64 = torch.float64


def assert_close_to_reference(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 outputs: summation order only. 16-bit outputs: one rounding of the result
    (half an ulp, 2^-9 of bf16's and 2^-12 of fp16's magnitude) plus fp32 sums."""
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    half_ulp = {torch.float32: 2**-20, torch.float16: 2**-11, torch.bfloat16: 2**-8}[out.dtype]
    torch.testing.assert_close(out.to(F64), expected, atol=half_ulp * scale + 1e-6, rtol=0)


def int4_operands(n: int, k: int, group: int, zero_points: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(groups, n, generator=generator) * 0.05 + 0.01).to(torch.float16)
    zeros = (
        torch.randint(0, 16, (groups, n), generator=generator, dtype=torch.uint8)
        if zero_points
        else None
    )
    effective = -(-k // 128) * 128 if group == -1 else group
    return ref.pack_int4(codes), scales, zeros, effective


def activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_pack_and_unpack_int4_round_trip_with_padding() -> None:
    codes = torch.randint(0, 16, (5, 200))
    packed = ref.pack_int4(codes)
    assert packed.shape == (5, 32)  # 200 padded to 256 codes, 8 per word
    assert torch.equal(ref.unpack_int4(packed, 200), codes.to(torch.uint8))
    # Word j of chunk c holds k = 128 c + 16 s + j in nibble s.
    word = int(packed[2, 16 + 3]) & 0xFFFFFFFF
    assert all((word >> (4 * s)) & 0xF == int(codes[2, 128 + 16 * s + 3]) for s in range(4))


# (m, n, k, group, zero points, split_k, block_n): ragged N (40, 72) and K (200: one and a
# half chunks; 96: less than one), each group size, decode rows and tiled M.
INT4_CASES = [
    (1, 40, 200, 32, True, 2, 16),
    (3, 72, 256, 16, False, 1, 32),
    (8, 64, 96, 32, True, 1, 16),
    (16, 48, 384, 128, False, 3, 16),
    (5, 40, 256, 64, True, 2, 32),
    (2, 24, 512, 256, True, 2, 16),
    (4, 40, 200, -1, False, 1, 16),
    (37, 72, 256, 64, True, 1, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k", "group", "zero_points", "split_k", "block_n"), INT4_CASES)
def test_w4a16_matches_float64_dequantize_then_matmul(
    m: int,
    n: int,
    k: int,
    group: int,
    zero_points: bool,
    split_k: int,
    block_n: int,
    dtype: torch.dtype,
) -> None:
    packed, scales, zeros, effective = int4_operands(n, k, group, zero_points, seed=m + n)
    x = activations(m, k, dtype, seed=k)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    block_m = 16 if m <= 16 else 32
    out = w4a16.w4a16_matmul(
        x,
        packed,
        scales,
        zeros,
        effective,
        bias,
        block_m=block_m,
        block_n=block_n,
        split_k=split_k,
        num_stages=2,
    )
    expected = ref.w4a16_linear(
        x.to(F64),
        packed,
        scales,
        zeros,
        effective,
        None if bias is None else bias.to(F64),
        compute_dtype=F64,
    )
    assert out.dtype == dtype
    assert_close_to_reference(out, expected)


def test_w4a16_decode_rows_are_batch_invariant() -> None:
    """Every M in 1..16 runs one binary (BLOCK_M 16): row i of a 9-row call is bitwise the
    1-row call on row i."""
    packed, scales, zeros, group = int4_operands(40, 256, 64, True, seed=3)
    x = activations(9, 256, torch.bfloat16, seed=4)
    batched = w4a16.w4a16_matmul(x, packed, scales, zeros, group, split_k=2, block_n=16)
    for row in (0, 4, 8):
        alone = w4a16.w4a16_matmul(
            x[row : row + 1], packed, scales, zeros, group, split_k=2, block_n=16
        )
        assert torch.equal(batched[row : row + 1], alone)


def test_w4a16_linear_gathers_act_order_inputs_and_dequantize_path_agrees() -> None:
    packed, scales, zeros, group = int4_operands(32, 128, 32, False, seed=5)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(6)).to(torch.int32)
    x = activations(3, 128, torch.float32, seed=7).view(1, 3, 128)
    expected = ref.w4a16_linear(
        x.to(F64), packed, scales, zeros, group, None, perm.long(), compute_dtype=F64
    )
    assert_close_to_reference(
        w4a16.w4a16_linear(x, packed, scales, zeros, group, None, perm), expected
    )
    saved = w4a16.DEQUANT_MIN_M
    w4a16.DEQUANT_MIN_M = 1
    try:
        dequantized = w4a16.w4a16_linear(x, packed, scales, zeros, group, None, perm)
    finally:
        w4a16.DEQUANT_MIN_M = saved
    assert_close_to_reference(dequantized, expected)


@pytest.mark.parametrize("zero_points", [True, False])
def test_dequantize_int4_kernel_equals_reference(zero_points: bool) -> None:
    packed, scales, zeros, group = int4_operands(40, 200, 32, zero_points, seed=8)
    out = w4a16.dequantize_int4(packed, scales, zeros, group, 200, torch.float32)
    assert torch.equal(out, ref.dequantize_int4(packed, scales, zeros, group, 200))


def w8a8_operands(n: int, k: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=generator) * 60
    if dtype == torch.int8:
        weight = values.round().clamp(-127, 127).to(torch.int8)
    else:
        weight = values.clamp(-448, 448).to(dtype)
    scales = torch.rand(n, generator=generator) * 0.01 + 1e-3
    return weight, scales


QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
# (m, n, k, split_k, block_k): ragged N and K, decode rows (x quantized in the kernel).
W8A8_SKINNY_CASES = [
    (1, 40, 96, 2, 32),
    (4, 64, 128, 1, 64),
    (9, 24, 200, 3, 32),
    (16, 48, 64, 1, 32),
]


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("m", "n", "k", "split_k", "block_k"), W8A8_SKINNY_CASES)
def test_w8a8_skinny_matches_float64_reference(
    m: int,
    n: int,
    k: int,
    split_k: int,
    block_k: int,
    x_dtype: torch.dtype,
    weight_dtype: torch.dtype,
) -> None:
    weight, scales = w8a8_operands(n, k, weight_dtype, seed=m)
    x = activations(m, k, x_dtype, seed=n)
    bias = torch.randn(n).to(x_dtype) if split_k > 1 else None
    out = w8a8.w8a8_matmul(
        x,
        weight,
        scales,
        bias,
        QMAX[weight_dtype],
        block_n=16,
        block_k=block_k,
        split_k=split_k,
        num_stages=2,
    )
    # The reference quantizes the same rows by the same rule.
    expected = ref.w8a8_linear(
        x.to(F64),
        weight,
        scales,
        None if bias is None else bias.to(F64),
        QMAX[weight_dtype],
        compute_dtype=F64,
    )
    assert_close_to_reference(out, expected)


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_quantize_rows_kernel_equals_reference_bitwise(weight_dtype: torch.dtype) -> None:
    x = activations(7, 300, torch.bfloat16, seed=9) * 3
    x[2] = 0  # a row of zeros gets scale 1
    codes, scales = w8a8.quantize_rows(x, weight_dtype, QMAX[weight_dtype])
    expected_codes, expected_scales = ref.quantize_rows(x, weight_dtype, QMAX[weight_dtype])
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_w8a8_linear_large_batches_quantize_once_then_multiply(weight_dtype: torch.dtype) -> None:
    """40 rows: quantize_rows, then (fp8) torch._scaled_mm, which the CPU build runs too,
    or (int8) the tiled kernel on the quantized rows."""
    weight, scales = w8a8_operands(48, 64, weight_dtype, seed=10)
    x = activations(40, 64, torch.float32, seed=11).view(2, 20, 64)
    bias = torch.randn(48)
    out = w8a8.w8a8_linear(x, weight, scales, bias, QMAX[weight_dtype])
    expected = ref.w8a8_linear(
        x.to(F64), weight, scales, bias.to(F64), QMAX[weight_dtype], compute_dtype=F64
    )
    assert out.shape == (2, 20, 48)
    if weight_dtype == torch.int8:
        assert_close_to_reference(out, expected)
    else:  # _scaled_mm's rowwise scaling gives bf16 (then cast to x's dtype)
        torch.testing.assert_close(out.to(F64), expected, atol=2**-8 * expected.abs().max(), rtol=0)


def test_w8a8_decode_rows_are_batch_invariant() -> None:
    weight, scales = w8a8_operands(40, 128, torch.float8_e4m3fn, seed=12)
    x = activations(11, 128, torch.bfloat16, seed=13)
    config = {"block_n": 16, "block_k": 32, "split_k": 2}
    batched = w8a8.w8a8_matmul(x, weight, scales, None, 448.0, **config)
    for row in (0, 6, 10):
        alone = w8a8.w8a8_matmul(x[row : row + 1], weight, scales, None, 448.0, **config)
        assert torch.equal(batched[row : row + 1], alone)


def test_kernels_reject_bad_arguments() -> None:
    packed, scales, zeros, group = int4_operands(16, 128, 32, True, seed=14)
    with pytest.raises(ValueError, match="group_size"):
        w4a16.w4a16_matmul(torch.ones(1, 128), packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="does not cover"):
        w4a16.w4a16_matmul(torch.ones(1, 256), packed, scales, zeros, group)
    weight, w_scales = w8a8_operands(16, 64, torch.int8, seed=15)
    with pytest.raises(ValueError, match="do not fit"):
        w8a8.w8a8_matmul(torch.ones(1, 32), weight, w_scales, None, 127.0)
    with pytest.raises(ValueError, match="fp8 e4m3 or int8"):
        w8a8.w8a8_matmul(torch.ones(1, 64), weight.float(), w_scales, None, 127.0)
