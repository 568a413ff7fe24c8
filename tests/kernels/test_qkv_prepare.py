"""The fused q/k norm + rotary + cache-store kernel against the unfused reference ops."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanner.kernels import reference  # noqa: E402
from lanner.kernels.qkv_prepare import qkv_prepare  # noqa: E402
from lanner.model.config import RopeConfig  # noqa: E402
from lanner.model.layers.rotary import RotaryEmbedding  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "norm"),
    [
        (4, 1, 24, False),
        (8, 2, 64, True),
        (6, 6, 32, True),
        (32, 8, 128, False),
        (40, 8, 128, True),
    ],
)
def test_matches_reference(dtype, heads, kv_heads, head_dim, norm) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens, block_size, num_blocks = 7, 4, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)  # strided views, as the model passes them
    k = k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 3, 9, 4, 17, 2, 30])
    slots = torch.tensor([5, 0, -1, 19, 7, 12, 3])  # -1: a padding token
    table = RotaryEmbedding(head_dim, RopeConfig(theta=10000.0), 64).cos_sin_cache
    q_w = (torch.rand(head_dim, generator=generator) + 0.5).to(dtype) if norm else None
    k_w = (torch.rand(head_dim, generator=generator) + 0.5).to(dtype) if norm else None

    expected_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    rq, rk = q, k
    if norm:
        rq, rk = reference.rms_norm(q, q_w, 1e-6), reference.rms_norm(k, k_w, 1e-6)
    rq = reference.apply_rotary(rq, positions, table)
    rk = reference.apply_rotary(rk, positions, table)
    reference.store_kv_cache(rk, v, expected_cache, slots)

    cache = torch.zeros_like(expected_cache)
    out = qkv_prepare(q, k, v, positions, table, cache, slots, q_w, k_w, 1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, rq, atol=tol, rtol=tol)
    torch.testing.assert_close(cache, expected_cache, atol=tol, rtol=tol)


def test_padding_tokens_and_empty_batches_write_nothing() -> None:
    table = RotaryEmbedding(16, RopeConfig(theta=10000.0), 8).cos_sin_cache
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    cache = torch.randn(2, 3, 4, 2, 16)
    before = cache.clone()
    out = qkv_prepare(q, k, v, torch.tensor([1, 5]), table, cache, torch.tensor([-1, -1]))
    assert torch.equal(cache, before)  # all padding: the cache is untouched
    torch.testing.assert_close(out, reference.apply_rotary(q, torch.tensor([1, 5]), table))
    empty = torch.empty(0, 2, 16)
    no_positions = torch.empty(0, dtype=torch.int64)
    result = qkv_prepare(empty, empty, empty, no_positions, table, cache, no_positions)
    assert result.shape == (0, 2, 16)


def test_float8_cache_saturates_like_the_reference() -> None:
    """An fp8 cache stores K/V rounded to e4m3, clamped at +-448. Triton 3.6's CPU
    interpreter rounds float -> float8 wrongly (its _convert_float drops the carry of a
    rounded-up mantissa), so this test feeds values e4m3 holds exactly (position 0: no
    rotation) and values past the range; rounding itself is the GPU's conversion,
    checked there by the fp8 parity run of benchmarks/engine_workloads.py."""
    table = RotaryEmbedding(16, RopeConfig(theta=10000.0), 8).cos_sin_cache
    grid = torch.tensor([0.0, 0.5, -1.75, 3.0, -13.0, 96.0, 448.0, -448.0])
    k = torch.cat([grid, torch.tensor([1000.0, -600.0, 2.5, -0.125, 20.0, 1.0, 6.0, 64.0])])
    k = k.repeat(2, 2, 1)  # [tokens, kv_heads, 16]
    v = -k.flip(-1)
    q = torch.randn(2, 4, 16)
    positions = torch.tensor([0, 0])
    slots = torch.tensor([5, 2])
    cache = torch.zeros(2, 2, 4, 2, 16, dtype=torch.float8_e4m3fn)
    expected = torch.zeros_like(cache)
    reference.store_kv_cache(k, v, expected, slots)
    qkv_prepare(q, k, v, positions, table, cache, slots)
    assert torch.equal(cache.float(), expected.float())
    assert expected.float().abs().max() == 448.0  # 1000 and -600 saturated
