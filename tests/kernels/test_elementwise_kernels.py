"""Triton RMSNorm and SiLU-and-mul against the pure-torch reference, run by Triton's CPU
interpreter at small shapes (rotary and the KV store: tests/kernels/test_qkv_prepare.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import reference  # noqa: E402
from lanner.kernels import rms_norm as norm_module  # noqa: E402
from tests.kernels import skip_unless_interpreted  # noqa: E402

skip_unless_interpreted(norm_module._rms_norm_kernel)

from lanner.kernels.activation import silu_and_mul  # noqa: E402
from lanner.kernels.rms_norm import fused_add_rms_norm, rms_norm  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Same-dtype comparison: the kernel and the reference round at the same points, so they
# differ only where fp32 reduction order flips a final rounding (one ulp of the dtype).
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}
EPS = 1e-6


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def qkv_views(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model gets them: strided [tokens, heads, head_dim] views of one qkv."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k = k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k, v


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOLERANCE[expected.dtype])


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 24), (3, 96), (40, 100), (1, 128), (2, 3, 40)])
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, seed=1) * 3
    weight = randn(shape[-1], dtype=dtype, seed=2)
    assert_close(rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_qk_views(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: [tokens, heads, head_dim] views cut out of a qkv tensor."""
    # 36 q rows of 128 span three 16-row programs, split mid-token.
    q, k, _ = qkv_views(tokens=9, heads=4, kv_heads=2, head_dim=128, dtype=dtype)
    weight = randn(128, dtype=dtype, seed=3)
    for view in (q, k):
        before = view.clone()
        assert_close(rms_norm(view, weight, EPS), reference.rms_norm(view, weight, EPS))
        assert torch.equal(view, before)


def test_rms_norm_uncollapsible_and_strided_layouts() -> None:
    base = randn(4, 3, 5, 2, 16, dtype=torch.float32, seed=4)
    weight = randn(16, dtype=torch.float32, seed=5)
    views = [
        base[:, :, :3, 0],  # three leading dims that do not merge: falls back to a copy
        base[:, 1, :, 1],  # two strided leading dims
        base[1:3, 2, 1, 0],  # rows with a non-unit stride
        base[0, 0, 0, 0],  # a single 1-D row
        base[0, :, 0, :, :].transpose(-1, -2)[..., 0],  # last dim not contiguous
    ]
    for view in views:
        assert_close(rms_norm(view, weight, EPS), reference.rms_norm(view, weight, EPS))


def test_rms_norm_weight_dtype_promotes_like_reference() -> None:
    x = randn(3, 24, dtype=torch.bfloat16, seed=6)
    weight = randn(24, dtype=torch.float32, seed=7)
    assert_close(rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 24), (3, 100), (2, 3, 32)])
def test_fused_add_rms_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, seed=8)
    residual = randn(*shape, dtype=dtype, seed=9) * 4
    weight = randn(shape[-1], dtype=dtype, seed=10)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = fused_add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_summed = reference.fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, expected_summed)  # one rounding of an fp32 sum: bit-exact
    assert_close(normed, expected_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_fused_add_rms_norm_strided_inputs() -> None:
    q, k, _ = qkv_views(tokens=3, heads=2, kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    weight = randn(16, dtype=torch.bfloat16, seed=11)
    normed, summed = fused_add_rms_norm(q, k, weight, EPS)
    expected_normed, expected_summed = reference.fused_add_rms_norm(q, k, weight, EPS)
    assert torch.equal(summed, expected_summed)
    assert_close(normed, expected_normed)


# ---------------------------------------------------------------- SiLU and mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 48), (2, 200), (2, 2, 24), (1, 2200)])
def test_silu_and_mul(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, seed=16) * 4
    assert_close(silu_and_mul(x), reference.silu_and_mul(x))


def test_silu_and_mul_strided_rows() -> None:
    base = randn(4, 3, 64, dtype=torch.bfloat16, seed=17)
    for view in (base[:, 1, :40], base[1:, ::2, :], base.transpose(0, 1)):
        assert_close(silu_and_mul(view), reference.silu_and_mul(view))


def test_empty_batches_launch_nothing() -> None:
    x = torch.empty(0, 4, 16)
    weight = torch.ones(16)
    assert rms_norm(x, weight, EPS).shape == (0, 4, 16)
    normed, summed = fused_add_rms_norm(x, x, weight, EPS)
    assert normed.shape == summed.shape == (0, 4, 16)
    assert silu_and_mul(torch.empty(0, 32)).shape == (0, 16)


def test_exponential_noise_is_exp1_and_a_function_of_the_seed() -> None:
    from lanner.kernels.sampling import exponential_noise

    noise = exponential_noise([7, 8, 7], 4096, torch.device("cpu"))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.isfinite(noise).all() and (noise >= 0).all()
    # Exp(1): mean 1, variance 1 (4096 draws per row: about 3 % standard error)
    assert abs(noise.mean().item() - 1.0) < 0.05 and abs(noise.var().item() - 1.0) < 0.1
    again = exponential_noise([8], 4096, torch.device("cpu"))
    assert torch.equal(again[0], noise[1])  # the same seed alone gives the same row
