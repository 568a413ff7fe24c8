"""The CPU's packed float32 and bf16 linears (kernels/cpu_linear.py) against F.linear: any
row count, with and without bias, each packed backend, a weight changed in place
(repacked), the backend's choice (the rule, LANNER_CPU_GEMM), and ops.linear's dispatch to
it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lanner.kernels import cpu_linear, ops

USABLE = cpu_linear.usable_backends()
BF16_USABLE = cpu_linear.usable_backends(torch.bfloat16)
pytestmark = pytest.mark.skipif(not USABLE, reason="no packed GEMM usable in this build")


@pytest.fixture(params=USABLE, ids=lambda gemm: gemm.name)
def pinned(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> cpu_linear.PackedGemm:
    """Every usable packed GEMM in turn, for every row count."""
    gemm = request.param
    monkeypatch.setattr(cpu_linear, "chosen", lambda dtype=None: cpu_linear.Choice(gemm, gemm))
    return gemm


@pytest.mark.parametrize("rows", [1, 2, 5, 32, 33, 288])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(rows: int, with_bias: bool) -> None:
    """By whatever this machine chose."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=generator)
    bias = torch.randn(200, generator=generator) if with_bias else None
    x = torch.randn(rows, 96, generator=generator)
    got = cpu_linear.linear(x, weight, bias)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 4, 33])
def test_each_backend_matches_f_linear(pinned: cpu_linear.PackedGemm, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(72, 40, generator=generator), torch.randn(72, generator=generator)
    x = torch.randn(rows, 40, generator=generator)
    torch.testing.assert_close(
        cpu_linear.linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4
    )
    assert pinned.name in weight._lanner_packed  # type: ignore[attr-defined]


def test_each_backend_in_use_keeps_its_own_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    if len(USABLE) < 2:
        pytest.skip("one packed backend here")
    weight, x = torch.randn(64, 48), torch.randn(8, 48)
    for gemm in USABLE:
        choice = cpu_linear.Choice(gemm, gemm)
        monkeypatch.setattr(cpu_linear, "chosen", lambda dtype=None, choice=choice: choice)
        torch.testing.assert_close(cpu_linear.linear(x, weight, None), F.linear(x, weight))
    assert set(weight._lanner_packed) == {gemm.name for gemm in USABLE}  # type: ignore[attr-defined]


@pytest.mark.parametrize("choice", ["mkl", "onednn", "torch", "auto", ""])
def test_the_environment_pins_the_backend(choice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, choice)
    cpu_linear.chosen.cache_clear()
    try:
        picked = cpu_linear.chosen()
        pinned = {g.name: g for g in cpu_linear.BACKENDS}.get(choice)
        if choice == "torch":
            assert picked == cpu_linear.Choice(None, None)
        elif pinned is not None and cpu_linear._row_independent(pinned, torch.float32):
            assert picked == cpu_linear.Choice(pinned, pinned)
        else:
            assert picked.rows in (None, *USABLE) and picked.single_row in (None, *USABLE)
    finally:
        cpu_linear.chosen.cache_clear()


def test_an_unknown_choice_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.CHOICE_ENV, "openblas")
    cpu_linear.chosen.cache_clear()
    try:
        with pytest.raises(ValueError, match="LANNER_CPU_GEMM='openblas'.*onednn.*mkl"):
            cpu_linear.chosen()
    finally:
        cpu_linear.chosen.cache_clear()


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_auto_takes_mkl_for_one_row_and_the_vendors_for_more(
    vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed rule (float32: more rows by MKL's on Intel, oneDNN's elsewhere), and
    what stands in where a backend is not usable."""
    monkeypatch.delenv(cpu_linear.CHOICE_ENV, raising=False)
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    mkl, onednn = cpu_linear.MKL, cpu_linear.ONEDNN
    cases = {
        (mkl, onednn): cpu_linear.Choice(mkl, mkl if vendor == "GenuineIntel" else onednn),
        (mkl,): cpu_linear.Choice(mkl, mkl),
        (onednn,): cpu_linear.Choice(None, onednn),
        (): cpu_linear.Choice(None, None),
    }
    for usable, expected in cases.items():
        monkeypatch.setattr(
            cpu_linear, "usable_backends", lambda dtype=None, usable=usable: list(usable)
        )
        cpu_linear.chosen.cache_clear()
        try:
            assert cpu_linear.chosen() == expected
        finally:
            cpu_linear.chosen.cache_clear()
    # bf16: oneDNN's for every row count (MKL has none); F.linear where it is not usable.
    bf16_cases = {(onednn,): cpu_linear.Choice(onednn, onednn), (): cpu_linear.Choice(None, None)}
    for usable, expected in bf16_cases.items():
        monkeypatch.setattr(
            cpu_linear, "usable_backends", lambda dtype=None, usable=usable: list(usable)
        )
        cpu_linear.chosen.cache_clear()
        try:
            assert cpu_linear.chosen(torch.bfloat16) == expected
        finally:
            cpu_linear.chosen.cache_clear()


def test_a_backend_whose_layout_depends_on_the_rows_is_ruled_out() -> None:
    """A packed copy that multiplies right only at PACK_ROWS rows fails the check."""
    real = USABLE[0]
    broken = cpu_linear.PackedGemm(
        "broken",
        real.pack,
        lambda x, packed, weight, bias, rows: (
            real.multiply(x, packed, weight, bias, rows) * (1.0 if rows == 32 else 1.001)
        ),
    )
    assert not cpu_linear._row_independent(broken, torch.float32)


def test_three_dimensional_input(pinned: cpu_linear.PackedGemm) -> None:
    weight, x = torch.randn(64, 48), torch.randn(3, 5, 48)
    torch.testing.assert_close(cpu_linear.linear(x, weight, None), F.linear(x, weight))


def test_a_weight_changed_in_place_is_repacked(pinned: cpu_linear.PackedGemm) -> None:
    weight, x = torch.randn(64, 48), torch.randn(8, 48)
    cpu_linear.linear(x, weight, None)
    with torch.no_grad():
        weight.copy_(torch.randn(64, 48))  # a reload writes new values into the same tensor
    torch.testing.assert_close(cpu_linear.linear(x, weight, None), F.linear(x, weight))


def test_ops_linear_takes_it_for_float32_and_bf16_cpu_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ops.linear(torch.randn(4, 16, dtype=dtype), torch.randn(8, 16, dtype=dtype))
    ops.linear(torch.randn(4, 16), torch.randn(8, 16, dtype=torch.bfloat16).float())
    assert calls == [torch.float32, torch.bfloat16, torch.float32]


@pytest.mark.skipif(not BF16_USABLE, reason="no packed bf16 GEMM here (no native bf16)")
@pytest.mark.parametrize("rows", [1, 3, 32, 33, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_matches_f_linear(rows: int, with_bias: bool) -> None:
    """Packed bf16 (oneDNN's, where the CPU multiplies bf16 natively) against F.linear in
    bf16: within a bf16 output's ulp or two (outputs here are ~10)."""
    assert cpu_linear.chosen(torch.bfloat16).rows is not None
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=generator).bfloat16()
    bias = torch.randn(200, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, 96, generator=generator).bfloat16()
    got = cpu_linear.linear(x, weight, bias)
    assert got.dtype == torch.bfloat16 and "onednn" in weight._lanner_packed  # type: ignore[attr-defined]
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=2e-2, atol=2e-1)


def test_packing_stops_at_its_budget_and_frees_with_the_weight(
    pinned: cpu_linear.PackedGemm, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(4, 48)
    weight = torch.randn(64, 48)
    monkeypatch.setattr(cpu_linear, "PACK_MAX_BYTES", cpu_linear._packed_bytes + weight.nbytes)
    cpu_linear.linear(x, weight, None)
    assert hasattr(weight, "_lanner_packed")
    over = torch.randn(64, 48)  # no room left: multiplied unpacked, still right
    torch.testing.assert_close(cpu_linear.linear(x, over, None), F.linear(x, over))
    assert not hasattr(over, "_lanner_packed")
    del weight  # its copy's bytes return to the budget
    cpu_linear.linear(x, over, None)
    assert hasattr(over, "_lanner_packed")
