"""The quantized matmul kernels against a float64 dequantize-then-matmul reference, in
Triton's CPU interpreter: the decode kernels of skinny_matmul (W8A16 for fp8/int8
weights with per-channel scales, both inner products; W4A16 for int4 codes with group
scales and zero points), the tiled W4A16 and W8A8 kernels for batches, the int4
dequantizer and the row quantizer (W8A8 also with each row's absmax given, as a
row-parallel rank runs it). Odd N and K (K not a multiple of the 512-code tile, shorter
than one plane), every group size the kernels take, zero points or none, split-K, bias,
act-order, and bitwise batch invariance of the decode rows."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import int4_gemv  # noqa: E402
from lanner.kernels import quant_reference as ref  # noqa: E402
from lanner.kernels import skinny_matmul as skinny  # noqa: E402
from lanner.kernels import w4a16_matmul as w4a16  # noqa: E402
from lanner.kernels import w8a8_matmul as w8a8  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402

skip_unless_interpreted(skinny._skinny_matmul_kernel)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
F64 = torch.float64
FP8 = torch.float8_e4m3fn


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
    effective = -(-k // ref.INT4_PLANE) * ref.INT4_PLANE if group == -1 else group
    return ref.pack_int4(codes), scales, zeros, effective


def int4_reference(x, packed, scales, zeros, group, bias, weight_dtype=None, perm=None):
    """float64 x @ W.T with W dequantized in float64 (the decode kernel's exact scaling) or
    rounded once to weight_dtype (the batched paths)."""
    return ref.w4a16_linear(
        x.to(F64),
        packed,
        scales,
        zeros,
        group,
        None if bias is None else bias.to(F64),
        perm,
        compute_dtype=F64,
        weight_dtype=weight_dtype,
    )


def activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_pack_and_unpack_int4_round_trip_with_padding() -> None:
    codes = torch.randint(0, 16, (5, 700))
    packed = ref.pack_int4(codes)
    assert packed.shape == (5, 128)  # 700 padded to two tiles of 512 codes, 8 per int32
    assert torch.equal(ref.unpack_int4(packed, 700), codes.to(torch.uint8))
    # 16-bit word p of tile t holds k = 512 t + 128 s + p in nibble s.
    words = packed.view(torch.int16)
    for tile, position in ((0, 3), (1, 17)):
        word = int(words[2, 128 * tile + position]) & 0xFFFF
        for s in range(4):
            k = 512 * tile + 128 * s + position
            expected = int(codes[2, k]) if k < 700 else 0
            assert (word >> (4 * s)) & 0xF == expected


# (m, n, k, group, zero points, split_k, block_n, block_k): ragged N (40, 72) and K (200:
# less than one tile; 600: a tile and a bit; 96: less than one plane), each group size,
# split-K across tiles, steps of one plane of 16 words to four of 128.
INT4_DECODE_CASES = [
    (1, 40, 200, 32, True, 1, 16, 128),
    (3, 72, 600, 16, False, 2, 32, 64),
    (8, 64, 96, 32, True, 1, 16, 64),
    (16, 48, 1024, 128, False, 2, 16, 512),
    (5, 40, 512, 64, True, 1, 64, 256),
    (2, 24, 1100, 256, True, 3, 16, 512),
    (4, 40, 200, -1, False, 1, 16, 512),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group", "zero_points", "split_k", "block_n", "block_k"), INT4_DECODE_CASES
)
@pytest.mark.parametrize("scale_weights", [False, True], ids=["exact", "scaled-weights"])
def test_skinny_w4_matches_float64_dequantize_then_matmul(
    m: int,
    n: int,
    k: int,
    group: int,
    zero_points: bool,
    split_k: int,
    block_n: int,
    block_k: int,
    dtype: torch.dtype,
    scale_weights: bool,
) -> None:
    """Exact scaling (each plane's fp32 sums scaled) against the float64 dequantized
    weights; scale_weights (each plane's weights scaled in registers, rounded once to x's
    dtype, the four planes' products chained) against the weights rounded once, as the
    batched paths round them, and batch invariant like the exact variant."""
    packed, scales, zeros, effective = int4_operands(n, k, group, zero_points, seed=m + n)
    x = activations(m, k, dtype, seed=k)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    options = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=2)
    out = skinny.skinny_matmul_w4(
        x, packed, scales, zeros, effective, bias, scale_weights=scale_weights, **options
    )
    assert out.dtype == dtype
    weight_dtype = dtype if scale_weights else None
    expected = int4_reference(x, packed, scales, zeros, effective, bias, weight_dtype)
    assert_close_to_reference(out, expected)
    if scale_weights and m > 1:
        alone = skinny.skinny_matmul_w4(
            x[1:2], packed, scales, zeros, effective, bias, scale_weights=True, **options
        )
        assert torch.equal(out[1:2], alone)


# (m, n, k, group, zero points, split_k, block_m, block_n, block_k): the tiled kernel.
INT4_TILED_CASES = [
    (37, 72, 600, 64, True, 2, 32, 32, 256),
    (20, 40, 200, 16, False, 1, 16, 16, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("m", "n", "k", "group", "zero_points", "split_k", "block_m", "block_n", "block_k"),
    INT4_TILED_CASES,
)
def test_tiled_w4a16_matches_reference_with_weights_rounded_once(
    m: int,
    n: int,
    k: int,
    group: int,
    zero_points: bool,
    split_k: int,
    block_m: int,
    block_n: int,
    block_k: int,
    dtype: torch.dtype,
) -> None:
    """Batches multiply the weights dequantized to x's dtype, each rounded once, as
    dequantize + cuBLAS does."""
    packed, scales, zeros, effective = int4_operands(n, k, group, zero_points, seed=m)
    x = activations(m, k, dtype, seed=n)
    bias = torch.randn(n).to(dtype)
    out = w4a16.w4a16_matmul(
        x,
        packed,
        scales,
        zeros,
        effective,
        bias,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
        num_stages=2,
    )
    expected = int4_reference(x, packed, scales, zeros, effective, bias, weight_dtype=dtype)
    assert_close_to_reference(out, expected)


def test_skinny_w4_decode_rows_are_batch_invariant() -> None:
    """On the tile path every M in 1..16 runs one binary (BLOCK_M 16): row i of a 9-row
    call is bitwise the 1-row call on row i. (A single row runs the int4 GEMV by default:
    gemv=False keeps it on the tile path; tests/kernels/test_int4_gemv.py checks the
    GEMV's own rows.)"""
    packed, scales, zeros, group = int4_operands(40, 600, 64, True, seed=3)
    x = activations(9, 600, torch.bfloat16, seed=4)
    config = {"split_k": 2, "block_n": 16, "block_k": 128, "gemv": False}
    batched = skinny.skinny_matmul_w4(x, packed, scales, zeros, group, **config)
    for row in (0, 4, 8):
        alone = skinny.skinny_matmul_w4(x[row : row + 1], packed, scales, zeros, group, **config)
        assert torch.equal(batched[row : row + 1], alone)


def test_w4a16_linear_gathers_act_order_inputs_on_every_path() -> None:
    """3 rows (the decode kernel, exact scaling), 20 rows (the tiled kernel) and 20 rows
    dequantized for the matmul (DEQUANT_MIN_M), all with an act-order permutation."""
    packed, scales, zeros, group = int4_operands(32, 128, 32, False, seed=5)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(6)).to(torch.int32)
    x = activations(3, 128, torch.float32, seed=7).view(1, 3, 128)
    expected = int4_reference(x, packed, scales, zeros, group, None, perm=perm.long())
    assert_close_to_reference(
        w4a16.w4a16_linear(x, packed, scales, zeros, group, None, perm), expected
    )
    batch = activations(20, 128, torch.bfloat16, seed=8)
    expected = int4_reference(
        batch, packed, scales, zeros, group, None, torch.bfloat16, perm.long()
    )
    assert_close_to_reference(
        w4a16.w4a16_linear(batch, packed, scales, zeros, group, None, perm), expected
    )
    saved = w4a16.DEQUANT_MIN_M
    w4a16.DEQUANT_MIN_M = 17
    try:
        dequantized = w4a16.w4a16_linear(batch, packed, scales, zeros, group, None, perm)
    finally:
        w4a16.DEQUANT_MIN_M = saved
    assert_close_to_reference(dequantized, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "zero_points"), [(32, True), (256, False)])
def test_dequantize_int4_kernel_equals_reference_bitwise(
    group: int, zero_points: bool, dtype: torch.dtype
) -> None:
    packed, scales, zeros, group = int4_operands(40, 600, group, zero_points, seed=8)
    out = w4a16.dequantize_int4(packed, scales, zeros, group, 600, dtype)
    assert torch.equal(out, ref.dequantize_int4(packed, scales, zeros, group, 600, dtype))


def w8_operands(n: int, k: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=generator) * 60
    if dtype == torch.int8:
        weight = values.round().clamp(-127, 127).to(torch.int8)
    else:
        weight = values.clamp(-448, 448).to(dtype)
    scales = torch.rand(n, generator=generator) * 0.01 + 1e-3
    return weight, scales


QMAX = {FP8: 448.0, torch.int8: 127.0}
# (m, n, k, split_k, block_n, block_k, use_dot): ragged N and K, decode rows, both inner
# products, split-K.
W8_DECODE_CASES = [
    (1, 40, 96, 2, 16, 32, False),
    (1, 40, 200, 1, 8, 64, False),
    (4, 64, 128, 1, 32, 64, True),
    (9, 24, 200, 3, 16, 32, True),
    (16, 48, 64, 1, 16, 32, True),
]


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize(
    "x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k", "block_n", "block_k", "use_dot"), W8_DECODE_CASES
)
@pytest.mark.parametrize("quantize_x", [True, False], ids=["w8a8", "w8a16"])
def test_skinny_w8_matches_float64_reference(
    m: int,
    n: int,
    k: int,
    split_k: int,
    block_n: int,
    block_k: int,
    use_dot: bool,
    x_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    quantize_x: bool,
) -> None:
    """Decode rows multiply the 8-bit weights widened exactly (weight_codes) by x rounded
    per token in the kernel as quantize_rows does (W8A8, what the model runs), or by x as
    it is (W8A16)."""
    weight, scales = w8_operands(n, k, weight_dtype, seed=m)
    x = activations(m, k, x_dtype, seed=n)
    bias = torch.randn(n).to(x_dtype) if split_k > 1 else None
    qmax = QMAX[weight_dtype] if quantize_x else None
    out = skinny.skinny_matmul_w8(
        x,
        weight,
        scales,
        bias,
        qmax,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
        use_dot=use_dot,
        num_stages=2,
    )
    bias64 = None if bias is None else bias.to(F64)
    if quantize_x:  # the reference quantizes the same rows by the same rule
        expected = ref.w8a8_linear(x.to(F64), weight, scales, bias64, qmax, compute_dtype=F64)
    else:
        expected = ref.w8a16_linear(x.to(F64), weight, scales, bias64, compute_dtype=F64)
    assert out.dtype == x_dtype
    assert_close_to_reference(out, expected)


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k", "block_n", "block_k", "use_dot"), W8_DECODE_CASES[:4]
)
def test_skinny_w8a8_prequantized_rows_give_the_same_bits(
    m: int,
    n: int,
    k: int,
    split_k: int,
    block_n: int,
    block_k: int,
    use_dot: bool,
    x_dtype: torch.dtype,
    weight_dtype: torch.dtype,
) -> None:
    """prequantize: the rows quantized by quantize_rows first and the kernel reading their
    codes gives bitwise what the kernel quantizing them itself gives (the same codes, the
    same products in the same order), and so matches the reference as closely."""
    weight, scales = w8_operands(n, k, weight_dtype, seed=m + 1)
    x = activations(m, k, x_dtype, seed=n + 1)
    bias = torch.randn(n).to(x_dtype) if split_k > 1 else None
    options = dict(block_n=block_n, block_k=block_k, split_k=split_k, use_dot=use_dot)
    qmax = QMAX[weight_dtype]
    fused = skinny.skinny_matmul_w8(x, weight, scales, bias, qmax, num_stages=2, **options)
    first = skinny.skinny_matmul_w8(
        x, weight, scales, bias, qmax, num_stages=2, prequantize=True, **options
    )
    assert first.dtype == x_dtype
    assert torch.equal(first, fused)
    bias64 = None if bias is None else bias.to(F64)
    expected = ref.w8a8_linear(x.to(F64), weight, scales, bias64, qmax, compute_dtype=F64)
    assert_close_to_reference(first, expected)


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
def test_tiled_w8a8_on_quantized_rows_matches_reference(weight_dtype: torch.dtype) -> None:
    weight, scales = w8_operands(40, 200, weight_dtype, seed=20)
    x = activations(37, 200, torch.bfloat16, seed=21)
    bias = torch.randn(40).to(torch.bfloat16)
    codes, x_scales = w8a8.quantize_rows(x, weight_dtype, QMAX[weight_dtype])
    out = w8a8.w8a8_matmul(
        codes,
        x_scales,
        weight,
        scales,
        bias,
        torch.bfloat16,
        block_m=16,
        block_n=16,
        block_k=64,
        split_k=2,
        num_stages=2,
    )
    # The reference quantizes the same rows by the same rule.
    expected = ref.w8a8_linear(
        x.to(F64), weight, scales, bias.to(F64), QMAX[weight_dtype], compute_dtype=F64
    )
    assert_close_to_reference(out, expected)


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
def test_quantize_rows_kernel_equals_reference_bitwise(weight_dtype: torch.dtype) -> None:
    x = activations(7, 300, torch.bfloat16, seed=9) * 3
    x[2] = 0  # a row of zeros gets scale 1
    codes, scales = w8a8.quantize_rows(x, weight_dtype, QMAX[weight_dtype])
    expected_codes, expected_scales = ref.quantize_rows(x, weight_dtype, QMAX[weight_dtype])
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
def test_w8a8_linear_quantizes_activations_per_token_at_every_batch_size(
    weight_dtype: torch.dtype,
) -> None:
    """3 rows: the skinny kernel, quantizing the rows itself; 40 rows: quantize_rows, then
    (fp8) torch._scaled_mm, which the CPU build runs too, or (int8) the tiled kernel."""
    weight, scales = w8_operands(48, 64, weight_dtype, seed=10)
    bias = torch.randn(48)
    decode = activations(3, 64, torch.float32, seed=12)
    expected = ref.w8a8_linear(
        decode.to(F64), weight, scales, bias.to(F64), QMAX[weight_dtype], compute_dtype=F64
    )
    out = w8a8.w8a8_linear(decode, weight, scales, bias, QMAX[weight_dtype])
    assert_close_to_reference(out, expected)
    x = activations(40, 64, torch.float32, seed=11).view(2, 20, 64)
    out = w8a8.w8a8_linear(x, weight, scales, bias, QMAX[weight_dtype])
    expected = ref.w8a8_linear(
        x.to(F64), weight, scales, bias.to(F64), QMAX[weight_dtype], compute_dtype=F64
    )
    assert out.shape == (2, 20, 48)
    if weight_dtype == torch.int8:
        assert_close_to_reference(out, expected)
    else:  # _scaled_mm's rowwise scaling gives bf16 (then cast to x's dtype)
        torch.testing.assert_close(out.to(F64), expected, atol=2**-8 * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("weight_dtype", [FP8, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("rows", [3, 20], ids=["skinny", "quantize_rows"])
def test_w8a8_linear_quantizes_by_a_given_row_absmax(weight_dtype: torch.dtype, rows: int) -> None:
    """A row-parallel rank's call: x is a slice of each row, quantized by the whole row's
    absmax (given), on the skinny kernel's path and quantize_rows' (then the tiled kernel
    or _scaled_mm); the rows' own absmax given is the call without it, bit for bit."""
    weight, scales = w8_operands(48, 64, weight_dtype, seed=16)
    qmax = QMAX[weight_dtype]
    whole = activations(rows, 128, torch.float32, seed=17)
    whole[1, 100] = 9.0  # row 1's absmax lies outside the slice
    whole[2] = 0  # a row of zeros gets scale 1
    x, absmax = whole[:, :64], ref.row_absmax(whole)
    out = w8a8.w8a8_linear(x, weight, scales, None, qmax, absmax)
    expected = ref.w8a8_linear(x.to(F64), weight, scales, None, qmax, F64, row_absmax=absmax)
    if weight_dtype == FP8 and rows > 16:  # _scaled_mm's bf16 output
        torch.testing.assert_close(out.to(F64), expected, atol=2**-8 * expected.abs().max(), rtol=0)
    else:
        assert_close_to_reference(out, expected)
    own = ref.row_absmax(x)
    mine = w8a8.w8a8_linear(x, weight, scales, None, qmax, own)
    assert torch.equal(mine, w8a8.w8a8_linear(x, weight, scales, None, qmax))
    if rows > 16:
        codes, x_scales = w8a8.quantize_rows(x, weight_dtype, qmax, absmax)
        expected_codes, expected_scales = ref.quantize_rows(x, weight_dtype, qmax, absmax)
        assert torch.equal(x_scales, expected_scales)
        assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    with pytest.raises(ValueError, match="row_absmax must be float32 of shape"):
        w8a8.w8a8_linear(x, weight, scales, None, qmax, absmax[:2])
    with pytest.raises(ValueError, match="needs x_qmax"):
        skinny.skinny_matmul_w8(x[:2], weight, scales, None, None, row_absmax=absmax[:2])


def test_skinny_w8_decode_rows_are_batch_invariant() -> None:
    weight, scales = w8_operands(40, 128, FP8, seed=12)
    x = activations(11, 128, torch.bfloat16, seed=13)
    config = {"block_n": 16, "block_k": 32, "split_k": 2}
    for qmax in (448.0, None):
        batched = skinny.skinny_matmul_w8(x, weight, scales, None, qmax, **config)
        for row in (0, 6, 10):
            alone = skinny.skinny_matmul_w8(x[row : row + 1], weight, scales, None, qmax, **config)
            assert torch.equal(batched[row : row + 1], alone)


def test_kernels_reject_bad_arguments() -> None:
    packed, scales, zeros, group = int4_operands(16, 128, 32, True, seed=14)
    with pytest.raises(ValueError, match="group_size"):
        skinny.skinny_matmul_w4(torch.ones(1, 128), packed, scales, zeros, 48)
    with pytest.raises(ValueError, match="does not cover"):
        w4a16.w4a16_matmul(torch.ones(20, 1024), packed, scales, zeros, group)
    with pytest.raises(ValueError, match="int4 block_k"):
        skinny.skinny_matmul_w4(
            torch.ones(1, 128), packed, scales, zeros, group, block_k=256, gemv=False
        )
    with pytest.raises(ValueError, match="dot path only"):
        skinny.skinny_matmul_w4(torch.ones(1, 128), packed, scales, zeros, group, use_dot=False)
    weight, w_scales = w8_operands(16, 64, torch.int8, seed=15)
    with pytest.raises(ValueError, match="do not fit"):
        skinny.skinny_matmul_w8(torch.ones(1, 32), weight, w_scales)
    with pytest.raises(ValueError, match="fp8 e4m3 or int8"):
        skinny.skinny_matmul_w8(torch.ones(1, 64), weight.float(), w_scales)
    with pytest.raises(ValueError, match="weight_scale"):
        skinny.skinny_matmul_w8(torch.ones(1, 64), weight, w_scales[:8])
    with pytest.raises(ValueError, match="quantized to"):
        w8a8.w8a8_matmul(torch.ones(20, 64), torch.ones(20), weight, w_scales, None, torch.float32)
    with pytest.raises(TypeError, match="unknown launch parameters"):
        skinny.skinny_matmul_w8(torch.ones(1, 64), weight, w_scales, block_size=4)


def test_installed_tuned_configs_replace_the_rules_and_can_be_cleared() -> None:
    """What engine_workloads.py --skinny-configs does with a GPU sweep's winners: a config
    for (format, rows 1 or 16, N, K) replaces choose_config's rule there (rows 16 standing
    for every M in 2..16), int4 ones only for groups their steps fit, and {} restores the
    rules."""
    ruled = skinny.choose_config(8, 4096, 4096, skinny.FP8)
    tuned = skinny.SkinnyConfig(64, 256, 2, num_warps=4, num_stages=4, use_dot=True)
    int4 = skinny.SkinnyConfig(32, 512, 4, num_warps=4, num_stages=3, use_dot=True)
    try:
        skinny.install_tuned_configs(
            {(skinny.FP8, 16, 4096, 4096): tuned, (skinny.INT4, 16, 4096, 4096): int4}
        )
        assert skinny.choose_config(8, 4096, 4096, skinny.FP8) == tuned
        assert skinny._plan(3, 4096, 4096, skinny.FP8, 0, *[None] * 7).block_n == 64
        assert skinny.choose_config(1, 4096, 4096, skinny.FP8) != tuned  # one row: own key
        assert skinny.choose_config(8, 4096, 4096, skinny.INT4, 128) == int4
        assert skinny.choose_config(8, 4096, 4096, skinny.INT4, 32) != int4  # steps > group
        with pytest.raises(ValueError, match="rows is 1 or 16"):
            skinny.install_tuned_configs({(skinny.FP8, 8, 4096, 4096): tuned})
        with pytest.raises(ValueError, match="dot path"):
            elementwise = skinny.SkinnyConfig(8, 1024, use_dot=False)
            skinny.install_tuned_configs({(skinny.FP8, 16, 4096, 4096): elementwise})
    finally:
        skinny.install_tuned_configs({})
    assert skinny.choose_config(8, 4096, 4096, skinny.FP8) == ruled


def test_shipped_tuned_configs_apply_to_their_card_only(tmp_path) -> None:
    """tuned/*.json (tune_quant.py's table, committed): the configs of the card the
    process runs on apply where no installed config covers the key; another card's do not,
    and a malformed entry names what is wrong."""
    import json

    entry = {
        "format": skinny.INT4,
        "rows": 1,
        "N": 4096,
        "K": 4096,
        "config": {
            "block_n": 128,
            "block_k": 256,
            "num_warps": 8,
            "num_stages": 4,
            "use_dot": True,
            "split_k": 1,
            "fused_reduce": True,
            "scale_weights": True,
        },
        "us": 5.0,
    }
    (tmp_path / "h200_quant.json").write_text(json.dumps({"NVIDIA H200": {"configs": [entry]}}))
    found = skinny.shipped_configs("NVIDIA H200", tmp_path)
    expected = skinny.SkinnyConfig(128, 256, 1, 8, 4, True, True, scale_weights=True)
    assert found == {(skinny.INT4, 1, 4096, 4096): expected}
    assert skinny.shipped_configs("NVIDIA H100 80GB HBM3", tmp_path) == {}
    ruled = skinny.choose_config(1, 4096, 4096, skinny.INT4)
    installed = skinny.SkinnyConfig(64, 256, 2, use_dot=True)
    try:
        skinny._SHIPPED.update(found)
        skinny.choose_config.cache_clear()
        assert skinny.choose_config(1, 4096, 4096, skinny.INT4) == expected
        assert skinny._plan(1, 4096, 4096, skinny.INT4, 128, *[None] * 7).scale_weights
        skinny.install_tuned_configs({(skinny.INT4, 1, 4096, 4096): installed})
        assert skinny.choose_config(1, 4096, 4096, skinny.INT4) == installed
    finally:
        skinny.install_tuned_configs({})
        skinny.use_shipped_configs(False)
    assert skinny.choose_config(1, 4096, 4096, skinny.INT4) == ruled
    bad = {**entry, "rows": 8}
    (tmp_path / "h200_quant.json").write_text(json.dumps({"NVIDIA H200": {"configs": [bad]}}))
    with pytest.raises(ValueError, match="rows is 1 or 16"):
        skinny.shipped_configs("NVIDIA H200", tmp_path)


def test_committed_tuned_tables_load_and_plan() -> None:
    """Every committed table (lanner/kernels/tuned/*.json) parses, and each config plans
    a launch at its shape (powers of two, int4 steps within a plane, dot path for 2-16)."""
    import json

    for path in sorted(skinny.SHIPPED_DIR.glob("*.json")):
        for card in json.loads(path.read_text()):
            for (fmt, rows, n, k), config in skinny.shipped_configs(card).items():
                if fmt == skinny.INT4_GEMV:
                    int4_gemv.gemv_plan(
                        rows,
                        n,
                        k,
                        -(-k // ref.INT4_TILE) * ref.INT4_TILE // 8,
                        config.block_n,
                        config.block_k,
                        config.split_k,
                        config.num_warps,
                        config.num_stages,
                    )
                    continue
                names = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "use_dot")
                skinny._plan(
                    rows,
                    n,
                    k,
                    fmt,
                    128,
                    *(getattr(config, name) for name in names),
                    True,
                    config.scale_weights,
                )
