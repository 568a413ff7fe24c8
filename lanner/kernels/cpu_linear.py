"""float32 and bf16 linear layers on the CPU through a packed GEMM: each weight is packed
once (kept on the weight tensor, repacked if the weight changes in place) so a step's GEMMs
skip the packing of B that ``torch.nn.functional.linear`` redoes on every call.

Why: a small model's step streams every weight once, so repacking each one per call costs
as much as the multiply. Measured on the 2-core development Xeon (one thread, the demo
model's eight layers plus its LM head, 32 rows, caches flushed between runs as a real step
finds them): F.linear 17.9-20.1 ms, MKL-packed 12.9-14.6 ms; 7 rows 14.9 ms against 9.1 ms.

Two packed GEMMs are in torch's CPU builds, MKL's (``mkl._mkl_linear``) and oneDNN's
(``mkldnn._linear_pointwise``, what torch.compile packs bf16 weights with), and none of the
three wins everywhere: on the 2-core AMD EPYC (AVX2), the demo model's linears with each
weight read from memory (benchmarks/cpu_gemm.py, 20261203-121909-cpu-gemm.json, medians)
took at 1 row 5.35 ms by F.linear, 4.39 by MKL and 5.34 by oneDNN, at 8 rows 11.4, 9.6 and
7.9 ms, at 32 rows 21.4, 19.6 and 18.4 ms; on a 2-core Xeon (Intel, AVX512 and AMX) at
1 row 5.25, 5.31 and 6.36 ms, at 8 rows 11.4, 7.6 and 8.5 ms, at 32 rows 16.6, 13.3 and
15.6 ms (20261203-174810-cpu-gemm.json). So one row multiplies through MKL's, and more
rows through MKL's on Intel's CPUs and oneDNN's elsewhere (the engine at 1 / 8 / 32
prompts on the AMD: 12.7 / 20.9 / 43.2 ms a step against 14.3 / 26.4 / 45.0 with MKL's for
more rows, 20261203-123034-cpu-gemm.json; on the Xeon at 32 prompts 24.3 ms against 25.9
with oneDNN's, 20261203-174810-cpu-gemm.json). The rule is fixed, not
timed at start: a choice timed on a busy machine could change a process's bits from one run
to the next. ``LANNER_CPU_GEMM`` (``onednn``, ``mkl``, or ``torch`` for F.linear) pins one
for every row count.

bf16 multiplies through oneDNN's at every row count (MKL's has no bf16), where the CPU
multiplies bf16 natively (AVX512-BF16 or AMX; elsewhere the loader runs bf16 models in
float32): on a 2-core Xeon with AMX, the demo model's bf16 linears with each weight read
from memory took 5.77 / 5.87 / 6.45 ms by F.linear at 1 / 8 / 32 rows and 3.87 / 3.93 /
4.63 ms packed, the engine's step 9.59 -> 7.60 ms at one prompt and 17.7 -> 16.1 ms at 32,
the same greedy tokens (benchmarks/cpu_gemm.py --dtype bfloat16,
20261203-174305-cpu-gemm.json).

torch's MKL path takes the packed buffer only when the rows equal the ``prepack_batch_size``
it is told, and neither library documents its packed layout. The weights are packed for
PACK_ROWS rows and used for any row count, which both layouts allow in practice (the rows
change only how the product is blocked); ``_row_independent`` checks that once per process
for each backend (products at many row counts against F.linear) and a backend that fails it
is not used.

A packed copy sits beside each weight (the original stays: embeddings tied to the LM
head read it), one per backend in use, so packing stops at PACK_MAX_BYTES of copies alive:
a larger model's remaining layers multiply through F.linear.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Rows the weights are packed for (a typical decode batch; any count is then accepted).
PACK_ROWS = 32
# The most bytes of packed copies kept at once (freed with their weights).
PACK_MAX_BYTES = 2 << 30
_packed_bytes = 0
# LANNER_CPU_GEMM's values besides the backends' names.
CHOICE_ENV = "LANNER_CPU_GEMM"
AUTO, TORCH = "auto", "torch"


@dataclass(frozen=True)
class PackedGemm:
    """One library's packed float32 GEMM: how a weight is packed, and x @ weight.T (+ bias)
    by the packed copy (``rows``: x's rows, which MKL's call takes)."""

    name: str
    pack: Callable[[torch.Tensor], torch.Tensor]
    multiply: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor
    ]
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)


ONEDNN = PackedGemm(
    "onednn",
    lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS),
    lambda x, packed, weight, bias, rows: torch.ops.mkldnn._linear_pointwise(
        x, packed, bias, "none", [], ""
    ),
    (torch.float32, torch.bfloat16),
)
MKL = PackedGemm(
    "mkl",
    lambda weight: torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS),
    lambda x, packed, weight, bias, rows: torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows),
)
BACKENDS = (ONEDNN, MKL)
# What the packed GEMMs take (x and weight both of one of these).
DTYPES = (torch.float32, torch.bfloat16)
# How far a packed product may sit from F.linear's in the row-independence check: float32
# rounding, or a bf16 output's ulp or two (outputs there are ~10: a wrong layout is ~10 off).
_CHECK_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-1)}


@dataclass(frozen=True)
class Choice:
    """What multiplies a single row and what multiplies more (None: F.linear)."""

    single_row: PackedGemm | None
    rows: PackedGemm | None

    def names(self) -> dict[str, str]:
        """{"single_row": ..., "rows": ...}: the libraries' names, ``torch`` for F.linear."""
        return {
            "single_row": self.single_row.name if self.single_row else TORCH,
            "rows": self.rows.name if self.rows else TORCH,
        }


@functools.cache
def chosen(dtype: torch.dtype = torch.float32) -> Choice:
    """The GEMMs this process multiplies ``dtype`` with (chosen once a dtype):
    LANNER_CPU_GEMM's for every row count, or with ``auto`` (the default) MKL's for one
    float32 row, and for more MKL's on an Intel CPU and oneDNN's elsewhere (oneDNN's for
    every bf16 row count: MKL has no bf16), each where usable (else the other packed one
    for more rows, F.linear for one)."""
    choice = os.environ.get(CHOICE_ENV, AUTO).strip().lower() or AUTO
    names = [gemm.name for gemm in BACKENDS]
    if choice not in (AUTO, TORCH, *names):
        raise ValueError(f"{CHOICE_ENV}={choice!r}: use one of {', '.join((AUTO, TORCH, *names))}")
    usable = usable_backends(dtype)
    if choice == AUTO:
        # More float32 rows: MKL's on Intel's CPUs, oneDNN's elsewhere (module docstring).
        order = (MKL, ONEDNN) if dtype == torch.float32 and cpu_vendor() == INTEL else (ONEDNN, MKL)
        rows = next((gemm for gemm in order if gemm in usable), None)
        # One float32 row: MKL's (oneDNN's measured no faster than F.linear there).
        single = (MKL if MKL in usable else None) if dtype == torch.float32 else rows
        return Choice(single, rows)
    pinned = next((gemm for gemm in usable if gemm.name == choice), None)
    if pinned is None and choice != TORCH:
        logger.warning(
            "%s=%s is not usable here for %s: those linears use F.linear", CHOICE_ENV, choice, dtype
        )
    return Choice(pinned, pinned)


INTEL = "GenuineIntel"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def usable_backends(dtype: torch.dtype = torch.float32) -> list[PackedGemm]:
    """The packed GEMMs of this torch build that multiply ``dtype`` as this module
    assumes here."""
    return [
        gemm
        for gemm in BACKENDS
        if dtype in gemm.dtypes and _library_present(gemm, dtype) and _row_independent(gemm, dtype)
    ]


def _library_present(gemm: PackedGemm, dtype: torch.dtype) -> bool:
    if gemm is MKL:
        return torch.backends.mkl.is_available()
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype != torch.bfloat16:
        return True
    # oneDNN packs bf16 only where the CPU multiplies it natively (AVX512-BF16, AMX).
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is not None and bool(supported())


@functools.cache
def _row_independent(gemm: PackedGemm, dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` weight packed for PACK_ROWS rows multiplies correctly at other
    row counts on this machine (checked once a backend and dtype: a product off by more
    than the dtype's rounding at any tried count rules the backend out for it)."""
    rtol, atol = _CHECK_TOLERANCE[dtype]
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 160, generator=generator).to(dtype)
        packed = gemm.pack(weight)
        # Every count up to twice the packed one (decode batches, a verify step's k + 1
        # rows per request), then two past any blocking a library might switch at.
        for rows in (*range(1, 2 * PACK_ROWS + 1), 100, 301):
            x = torch.randn(rows, 160, generator=generator).to(dtype)
            got = gemm.multiply(x, packed, weight, None, rows)
            expected = F.linear(x, weight)
            if not torch.allclose(got.float(), expected.float(), rtol=rtol, atol=atol):
                return False
    except (RuntimeError, AttributeError):  # the op is missing or refuses this CPU
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) for CPU tensors of one of DTYPES, by the GEMM chosen for
    their dtype and x's rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    choice = chosen(x.dtype)
    gemm = choice.single_row if rows == 1 else choice.rows
    packed = _packed(weight, gemm) if gemm is not None and rows and weight.dim() == 2 else None
    if gemm is None or packed is None:
        return F.linear(x, weight, bias)
    return gemm.multiply(x, packed, weight, bias, rows)


def _packed(weight: torch.Tensor, gemm: PackedGemm) -> torch.Tensor | None:
    """The weight's packed copy for ``gemm``, made on first use and again after an in-place
    change (a weight reload, seen by the tensor's version counter or a new storage); None
    once PACK_MAX_BYTES of copies are alive."""
    global _packed_bytes
    copies: dict[str, tuple[tuple[int, int], torch.Tensor]] | None = getattr(
        weight, "_lanner_packed", None
    )
    key = (weight._version, weight.data_ptr())
    cached = copies.get(gemm.name) if copies is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    if cached is None:
        size = weight.numel() * weight.element_size()
        if _packed_bytes + size > PACK_MAX_BYTES:
            return None
        _packed_bytes += size
        weakref.finalize(weight, _release, size)
    if copies is None:
        copies = weight._lanner_packed = {}  # type: ignore[attr-defined]
    packed = gemm.pack(weight.detach().contiguous())
    copies[gemm.name] = (key, packed)
    return packed


def _release(size: int) -> None:
    global _packed_bytes
    _packed_bytes -= size
