"""The int4 W4A16 GEMV (kernels/int4_gemv.py) against a float64 dequantize-then-matmul
reference in Triton's CPU interpreter: odd N and K (K not a multiple of the 512-code tile,
shorter than a plane), every group size, zero points or none, 1-16 rows, split-K with the
fused and the separate reduce, bias, each activation dtype; its rows independent of each
other; and skinny_matmul_w4's dispatch (the GEMV for one row by rule, the tile path where
asked or switched off)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import int4_gemv  # noqa: E402
from lanner.kernels import quant_reference as ref  # noqa: E402
from lanner.kernels import skinny_matmul as skinny  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402
from tests.kernels.test_quant_matmul import (  # noqa: E402
    activations,
    int4_operands,
    int4_reference,
)

skip_unless_interpreted(int4_gemv._int4_gemv_kernel)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
F64 = torch.float64


def assert_close(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, scales) -> None:
    """16-bit outputs: one rounding (half an ulp of the largest output) plus fp32 sums.
    fp32 outputs: the GEMV multiplies x by 16 + q (exact) and takes (16 + zero) x sum x off
    each chunk's sum, so each product carries a rounding of up to 2^-24 of |x| 31 (and the
    sums about as much again): at most 2 x 31 x 2^-24 x sum |x| x max scale a row."""
    assert out.shape == expected.shape
    scale = expected.abs().max().item()
    if out.dtype == torch.float32:
        bound = 2 * 31 * 2**-24 * x.abs().sum(-1).max().item() * scales.float().max().item()
        atol = bound + 2**-22 * scale
    else:
        atol = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[out.dtype] * scale + 1e-6
    torch.testing.assert_close(out.to(F64), expected, atol=atol, rtol=0)


# (m, n, k, group, zero points, block_n, block_k, num_warps, split_k, prefetch): one row
# and many, K off the tile (700, 200: one short plane), every group size, -1 = one group a
# row, the next step's words prefetched or not.
GEMV_CASES = [
    (1, 40, 700, 64, True, 8, 1024, 1, 1, False),
    (3, 24, 1100, 128, False, 4, 1024, 1, 2, True),
    (16, 9, 300, 16, True, 8, 2048, 2, 1, False),
    (2, 33, 1536, 32, False, 16, 1024, 1, 4, False),
    (5, 20, 1024, 256, True, 8, 1024, 1, 2, False),
    (1, 17, 200, -1, False, 4, 1024, 1, 1, True),
    (8, 12, 2048, 128, True, 4, 2048, 2, 2, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    (
        "m",
        "n",
        "k",
        "group",
        "zero_points",
        "block_n",
        "block_k",
        "num_warps",
        "split_k",
        "prefetch",
    ),
    GEMV_CASES,
)
def test_gemv_matches_float64_dequantize_then_matmul(
    m: int,
    n: int,
    k: int,
    group: int,
    zero_points: bool,
    block_n: int,
    block_k: int,
    num_warps: int,
    split_k: int,
    prefetch: bool,
    dtype: torch.dtype,
) -> None:
    packed, scales, zeros, effective = int4_operands(n, k, group, zero_points, seed=m + n + k)
    x = activations(m, k, dtype, seed=k + 1)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    out = skinny.skinny_matmul_w4(
        x,
        packed,
        scales,
        zeros,
        effective,
        bias,
        gemv=True,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        split_k=split_k,
        num_stages=1,
        prefetch=prefetch,
    )
    assert out.dtype == dtype
    expected = int4_reference(x, packed, scales, zeros, effective, bias)
    assert_close(out, expected, x, scales)


def test_gemv_rows_are_independent_and_reduces_agree() -> None:
    """Row i of a 9-row call is bitwise the 1-row and the 2-row call on it (each output row
    is its own x row times the same words in the same order), and the separate reduce
    kernel gives the fused reduce's bits."""
    packed, scales, zeros, group = int4_operands(40, 1100, 64, True, seed=5)
    x = activations(9, 1100, torch.bfloat16, seed=6)
    config = dict(gemv=True, block_n=8, block_k=1024, num_warps=1, split_k=2, num_stages=1)
    batched = skinny.skinny_matmul_w4(x, packed, scales, zeros, group, **config)
    for row in (0, 4, 8):
        alone = skinny.skinny_matmul_w4(x[row : row + 1], packed, scales, zeros, group, **config)
        assert torch.equal(batched[row : row + 1], alone)
    pair = skinny.skinny_matmul_w4(x[3:5], packed, scales, zeros, group, **config)
    assert torch.equal(batched[3:5], pair)
    separate = skinny.skinny_matmul_w4(
        x, packed, scales, zeros, group, **config, fused_reduce=False
    )
    assert torch.equal(batched, separate)


def test_dispatch_runs_the_gemv_for_one_row_unless_told_otherwise() -> None:
    """One row: the GEMV by rule (its own rounding: the tile path's bits differ in the
    last place); gemv=False, a tile-path option or use_int4_gemv(False) keep the tile path;
    2-16 rows take the tile path unless a tuned GEMV config covers the shape."""
    packed, scales, zeros, group = int4_operands(24, 1024, 128, False, seed=7)
    x = activations(1, 1024, torch.float32, seed=8)
    assert skinny.choose_int4_config(1, 24, 1024, 128)[0]
    assert not skinny.choose_int4_config(8, 24, 1024, 128)[0]
    skinny.use_int4_gemv(True)
    default = skinny.skinny_matmul_w4(x, packed, scales, zeros, group)
    gemv = skinny.skinny_matmul_w4(x, packed, scales, zeros, group, gemv=True)
    tiles = skinny.skinny_matmul_w4(x, packed, scales, zeros, group, gemv=False)
    assert torch.equal(default, gemv)
    options = skinny.skinny_matmul_w4(x, packed, scales, zeros, group, scale_weights=False)
    assert torch.equal(options, tiles)
    enabled = skinny._GEMV_STATE["enabled"]
    try:
        skinny.use_int4_gemv(False)
        assert not skinny.choose_int4_config(1, 24, 1024, 128)[0]
        off = skinny.skinny_matmul_w4(x, packed, scales, zeros, group)
        assert torch.equal(off, tiles)
    finally:
        skinny.use_int4_gemv(enabled)
    tuned = skinny.SkinnyConfig(4, 1024, 2, num_warps=1, num_stages=1, use_dot=False)
    # What benchmarks/gemv_w4.py --tuned-out writes where the tile path measured faster.
    tiles_won = skinny.SkinnyConfig(8, 1024, 1, 1, 1, use_dot=False, gemv=False)
    try:
        skinny.install_tuned_configs(
            {(skinny.INT4_GEMV, 16, 24, 1024): tuned, (skinny.INT4_GEMV, 1, 24, 1024): tiles_won}
        )
        assert skinny.choose_int4_config(8, 24, 1024, 128) == (True, tuned)
        assert not skinny.choose_int4_config(8, 24, 1024, 128, gemv=False)[0]
        assert not skinny.choose_int4_config(1, 24, 1024, 128)[0]
        assert skinny.choose_int4_config(1, 24, 1024, 128, gemv=True) == (True, tiles_won)
        assert torch.equal(skinny.skinny_matmul_w4(x, packed, scales, zeros, group), tiles)
        with pytest.raises(ValueError, match="prefetch is for the int4 GEMV"):
            skinny.install_tuned_configs({(skinny.INT4, 1, 24, 1024): tuned.__class__(
                64, 512, prefetch=True)})  # fmt: skip
    finally:
        skinny.install_tuned_configs({})
    assert not skinny.choose_int4_config(8, 24, 1024, 128)[0]
    assert skinny.choose_int4_config(1, 24, 1024, 128)[0]


def test_gemv_rule_fits_every_w1_shape() -> None:
    """The rule's step is one 16-byte load a thread (block_k = 1024 x num_warps) dividing
    the row where it can, with about two programs an SM."""
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1024, 3072)):
        gemv, config = skinny.choose_int4_config(1, n, k, 128)
        assert gemv and config.block_k == 1024 * config.num_warps
        row_ints = -(-k // 512) * 64
        assert row_ints % (config.block_k // 8) == 0
        plan = int4_gemv.gemv_plan(
            1, n, k, row_ints, config.block_n, config.block_k, config.split_k,
            config.num_warps, config.num_stages,
        )  # fmt: skip
        assert plan.even and plan.grid[1] == config.split_k


def test_gemv_rejects_bad_parameters() -> None:
    packed, scales, zeros, group = int4_operands(16, 512, 128, False, seed=9)
    x = torch.ones(1, 512)
    with pytest.raises(ValueError, match="at least 1024 x num_warps"):
        skinny.skinny_matmul_w4(x, packed, scales, zeros, group, gemv=True, block_k=512)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        skinny.skinny_matmul_w4(x, packed, scales, zeros, group, gemv=True, block_n=6)
    with pytest.raises(TypeError, match="unknown int4 GEMV launch parameters"):
        skinny.skinny_matmul_w4(x, packed, scales, zeros, group, gemv=True, scale_weights=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plane_values_are_each_code_plus_the_planes_offset(dtype: torch.dtype) -> None:
    """The bit trick itself: every code of every plane, low and high word, as 16 + q (fp32
    x), or with the shifts shared by two planes (16-bit x) 256 + q in planes 0 and 2."""
    codes = torch.arange(512) % 16
    codes = codes[torch.randperm(512, generator=torch.Generator().manual_seed(1))]
    packed = ref.pack_int4(codes.view(1, 512))
    scales = torch.ones(4, 1, dtype=dtype)
    x = torch.eye(512, dtype=dtype)  # row j picks code j: out[j] = q_j - 8
    out = skinny.skinny_matmul_w4(
        x, packed, scales, None, 128, gemv=True, block_n=4, block_k=1024, num_warps=1
    )
    assert torch.equal(out[:, 0].float(), codes.float() - 8)
