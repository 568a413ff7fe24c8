"""float32 linear layers on the CPU through MKL's packed GEMM: each weight is packed once
(kept on the weight tensor, repacked if the weight changes in place) so a step's GEMMs
skip the packing of B that ``torch.nn.functional.linear`` redoes on every call.

Why: measured on the 2-core development Xeon (one thread, the demo model's eight layers
plus its LM head, 32 rows, caches flushed between runs as a real step finds them):
F.linear 17.9-20.1 ms, packed 12.9-14.6 ms; 7 rows 14.9 ms against 9.1 ms; 1 row level
(5.9 ms). A small model's step streams every weight once, so repacking each one per call
costs as much as the multiply.

torch only takes the packed path when the rows equal the ``prepack_batch_size`` it is
told, and MKL documents no layout for the packed buffer. The buffer is packed for
PACK_ROWS rows and used for any row count, which MKL's packed layout allows in practice
(the rows change only how the product is blocked); ``packed_layout_is_row_independent``
checks that once per process on this CPU's MKL (products at several row counts against
F.linear) and everything stays on F.linear when it does not hold.

A packed copy sits beside each weight (the original stays: embeddings tied to the LM
head and one-row products read it), so packing stops at PACK_MAX_BYTES of copies alive:
a larger model's remaining layers multiply through F.linear.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

# Rows the weights are packed for (a typical decode batch; any count is then accepted).
PACK_ROWS = 32
# The most bytes of packed copies kept at once (freed with their weights).
PACK_MAX_BYTES = 2 << 30
_packed_bytes = 0
# One row multiplies as fast unpacked (the GEMV streams the weight either way), and
# F.linear is what HF runs there: the same bits as the oracle at batch 1.
MIN_PACKED_ROWS = 2


def available() -> bool:
    """MKL's packed GEMM is in this torch build and behaves as this module assumes."""
    return torch.backends.mkl.is_available() and packed_layout_is_row_independent()


@functools.cache
def packed_layout_is_row_independent() -> bool:
    """Whether a weight packed for PACK_ROWS rows multiplies correctly at other row
    counts on this machine (checked once: a product off by more than float32 rounding
    at any tried count turns the packed path off)."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 160, generator=generator)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
        # Every count up to twice the packed one (decode batches, a verify step's k + 1
        # rows per request), then two past any blocking MKL might switch at.
        for rows in (*range(MIN_PACKED_ROWS, 2 * PACK_ROWS + 1), 100, 301):
            x = torch.randn(rows, 160, generator=generator)
            got = torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
            if not torch.allclose(got, F.linear(x, weight), rtol=1e-5, atol=1e-4):
                return False
    except (RuntimeError, AttributeError):  # no MKL ops in this build
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) for float32 CPU tensors: packed GEMM from MIN_PACKED_ROWS
    rows, F.linear below."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < MIN_PACKED_ROWS or weight.dim() != 2 or not available():
        return F.linear(x, weight, bias)
    packed = _packed(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's MKL-packed copy, made on first use and again after an in-place change
    (a weight reload, seen by the tensor's version counter or a new storage); None once
    PACK_MAX_BYTES of copies are alive."""
    global _packed_bytes
    cached = getattr(weight, "_lanner_mkl_packed", None)
    version = weight._version
    if cached is not None and cached[0] == version and cached[1] == weight.data_ptr():
        return cached[2]
    if cached is None:
        size = weight.numel() * weight.element_size()
        if _packed_bytes + size > PACK_MAX_BYTES:
            return None
        _packed_bytes += size
        weakref.finalize(weight, _release, size)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)
    weight._lanner_mkl_packed = (version, weight.data_ptr(), packed)  # type: ignore[attr-defined]
    return packed


def _release(size: int) -> None:
    global _packed_bytes
    _packed_bytes -= size
