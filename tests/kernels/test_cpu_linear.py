"""The CPU's packed float32 linear (kernels/cpu_linear.py) against F.linear: any row
count, with and without bias, a weight changed in place (repacked), and ops.linear's
dispatch to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lanner.kernels import cpu_linear, ops

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no MKL packed GEMM")


@pytest.mark.parametrize("rows", [1, 2, 5, 32, 33, 288])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=generator)
    bias = torch.randn(200, generator=generator) if with_bias else None
    x = torch.randn(rows, 96, generator=generator)
    got = cpu_linear.linear(x, weight, bias)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_three_dimensional_input() -> None:
    weight, x = torch.randn(64, 48), torch.randn(3, 5, 48)
    torch.testing.assert_close(cpu_linear.linear(x, weight, None), F.linear(x, weight))


def test_a_weight_changed_in_place_is_repacked() -> None:
    weight, x = torch.randn(64, 48), torch.randn(8, 48)
    cpu_linear.linear(x, weight, None)
    with torch.no_grad():
        weight.copy_(torch.randn(64, 48))  # a reload writes new values into the same tensor
    torch.testing.assert_close(cpu_linear.linear(x, weight, None), F.linear(x, weight))


def test_ops_linear_takes_it_for_float32_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a: calls.append(1) or real(*a))
    ops.linear(torch.randn(4, 16), torch.randn(8, 16))
    ops.linear(torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16))
    assert calls == [1]


def test_packing_stops_at_its_budget_and_frees_with_the_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.randn(4, 48)
    weight = torch.randn(64, 48)
    monkeypatch.setattr(cpu_linear, "PACK_MAX_BYTES", cpu_linear._packed_bytes + weight.nbytes)
    cpu_linear.linear(x, weight, None)
    assert hasattr(weight, "_lanner_mkl_packed")
    over = torch.randn(64, 48)  # no room left: multiplied unpacked, still right
    torch.testing.assert_close(cpu_linear.linear(x, over, None), F.linear(x, over))
    assert not hasattr(over, "_lanner_mkl_packed")
    del weight  # its copy's bytes return to the budget
    cpu_linear.linear(x, over, None)
    assert hasattr(over, "_lanner_mkl_packed")
