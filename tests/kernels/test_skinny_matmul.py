"""The skinny-matmul Triton kernel (x @ weight.T + bias for a few rows of x) against
torch.nn.functional.linear, run by Triton's CPU interpreter at small shapes: both inner
products (tensor-core dot and elementwise), split-K, ragged N and K, bias, and bitwise
batch invariance (row i of an 8-row call equals the 1-row call on row i)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lanner.kernels import skinny_matmul as skinny_module  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402

skip_unless_interpreted(skinny_module._skinny_matmul_kernel)

from lanner.kernels.skinny_matmul import (  # noqa: E402
    SkinnyConfig,
    choose_config,
    skinny_matmul,
    use_skinny,
)

# The interpreter reads a K loop bound held in a 1-element array through a deprecated
# NumPy conversion, once per program.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# Against F.linear in the same dtype: both round an fp32 (or wider) sum once, so they
# differ where the summation order flips that rounding (one ulp of the output dtype).
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}
# Small tiles so that the interpreter runs several programs and K steps per call.
SMALL = {"block_n": 16, "block_k": 32, "num_warps": 2, "num_stages": 2}


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    x = randn(m, k, dtype=dtype, seed=seed)
    # Scaled so that outputs are about N(0, 1) whatever K is.
    weight = randn(n, k, dtype=dtype, seed=seed + 1, scale=k**-0.5)
    b = randn(n, dtype=dtype, seed=seed + 2) if bias else None
    return x, weight, b


def assert_matches_linear(out: torch.Tensor, x, weight, bias) -> None:
    expected = F.linear(x, weight, bias)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **TOLERANCE[expected.dtype])


CASES = [
    # (m, n, k, split_k): ragged N and K (100, 72), and multiples of the tiles (64, 128)
    (1, 100, 72, 1),
    (3, 100, 72, 3),
    (8, 64, 128, 1),
    (16, 64, 128, 2),
    (16, 100, 72, 1),
    (1, 64, 128, 4),
]


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("m", "n", "k", "split_k"), CASES)
def test_matches_linear(
    m: int, n: int, k: int, split_k: int, dtype: torch.dtype, use_dot: bool
) -> None:
    # Bias on every other case keeps the grid small; both the direct epilogue and the
    # split-K reduction see it.
    with_bias = (m + split_k) % 2 == 0
    x, weight, bias = operands(m, n, k, dtype, with_bias, seed=m * 7 + split_k)
    out = skinny_matmul(x, weight, bias, split_k=split_k, use_dot=use_dot, **SMALL)
    assert_matches_linear(out, x, weight, bias)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "elementwise"])
def test_bias_with_and_without_split(split_k: int, use_dot: bool) -> None:
    for with_bias in (False, True):
        x, weight, bias = operands(2, 40, 72, torch.bfloat16, with_bias, seed=5)
        out = skinny_matmul(x, weight, bias, split_k=split_k, use_dot=use_dot, **SMALL)
        assert_matches_linear(out, x, weight, bias)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "elementwise"])
def test_rows_are_batch_invariant(split_k: int, use_dot: bool) -> None:
    """Row i of an 8-row call is bitwise the 1-row call on row i, same config."""
    x, weight, bias = operands(8, 100, 72, torch.bfloat16, bias=True, seed=11)
    config = {"split_k": split_k, "use_dot": use_dot, **SMALL}
    batched = skinny_matmul(x, weight, bias, **config)
    for row in (0, 5, 7):
        alone = skinny_matmul(x[row : row + 1], weight, bias, **config)
        assert torch.equal(batched[row : row + 1], alone)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "elementwise"])
def test_fused_and_separate_split_k_reductions_agree_bitwise(use_dot: bool) -> None:
    """Both add the splits in index order; the fused one leaves its counters at zero, so a
    second launch (a CUDA graph replay) finds them ready."""
    x, weight, bias = operands(20, 100, 72, torch.bfloat16, bias=True, seed=13)
    config = {"split_k": 3, "use_dot": use_dot, **SMALL}
    separate = skinny_matmul(x, weight, bias, fused_reduce=False, **config)
    for _ in range(2):
        fused = skinny_matmul(x, weight, bias, fused_reduce=True, **config)
        assert torch.equal(fused, separate)
        assert not skinny_module._COUNTERS[x.device].any()
    assert_matches_linear(fused, x, weight, bias)


def test_default_config_and_leading_dims() -> None:
    """No config given: choose_config's; x with two leading dims, like F.linear."""
    x = randn(2, 3, 96, dtype=torch.bfloat16, seed=20)
    weight = randn(48, 96, dtype=torch.bfloat16, seed=21, scale=96**-0.5)
    out = skinny_matmul(x, weight)
    assert out.shape == (2, 3, 48)
    assert_matches_linear(out, x, weight, None)


def test_fp16_strided_rows_and_more_than_16_rows() -> None:
    base = randn(20, 80, dtype=torch.float16, seed=30)
    x = base[:, :72]  # rows with stride 80
    weight = randn(24, 72, dtype=torch.float16, seed=31, scale=72**-0.5)
    bias = randn(24, dtype=torch.float16, seed=32)
    # 20 rows: two program rows of 16 over M
    out = skinny_matmul(x, weight, bias, split_k=2, **SMALL)
    assert_matches_linear(out, x, weight, bias)


def test_empty_inputs() -> None:
    weight = randn(8, 16, dtype=torch.float32, seed=40)
    assert skinny_matmul(torch.empty(0, 16), weight).shape == (0, 8)
    bias = randn(3, dtype=torch.float32, seed=41)
    out = skinny_matmul(torch.empty(2, 0), torch.empty(3, 0), bias)
    assert torch.equal(out, bias.expand(2, 3))


def test_rejects_bad_arguments() -> None:
    x = torch.ones(2, 16)
    with pytest.raises(ValueError, match="cast one"):
        skinny_matmul(x, torch.ones(4, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not fit"):
        skinny_matmul(x, torch.ones(4, 8))
    with pytest.raises(ValueError, match="bias"):
        skinny_matmul(x, torch.ones(4, 16), torch.ones(3))
    with pytest.raises(ValueError, match="power of two"):
        skinny_matmul(x, torch.ones(4, 16), block_n=24)
    with pytest.raises(ValueError, match="use_dot"):
        skinny_matmul(x, torch.ones(4, 16), block_n=8, use_dot=True)


REAL_SHAPES = [
    # qwen3-0.6b: qkv, o, gate_up, down, lm_head; llama3-8b: the same five
    (4096, 1024),
    (1024, 2048),
    (6144, 1024),
    (1024, 3072),
    (151936, 1024),
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),
    (128256, 4096),
]


@pytest.mark.parametrize(("n", "k"), REAL_SHAPES)
def test_choose_config_is_valid_and_the_same_for_every_m_above_one(n: int, k: int) -> None:
    configs = {choose_config(m, n, k) for m in (2, 4, 8, 16)}
    assert len(configs) == 1  # one config for M in 2..16 keeps those rows batch invariant
    for config in (*configs, choose_config(1, n, k)):
        assert isinstance(config, SkinnyConfig)
        assert config.block_n & (config.block_n - 1) == 0
        assert config.block_k >= 16 and config.block_k & (config.block_k - 1) == 0
        assert not config.use_dot or config.block_n >= 16
        assert config.split_k >= 1 and config.split_k * config.block_k <= k
        programs = -(-n // config.block_n) * config.split_k
        assert programs >= 64  # about half the SMs at least


def test_use_skinny_threshold() -> None:
    assert use_skinny(1, 4096, 4096) and use_skinny(16, 1024, 1024)
    assert not use_skinny(0, 4096, 4096) and not use_skinny(17, 4096, 4096)
