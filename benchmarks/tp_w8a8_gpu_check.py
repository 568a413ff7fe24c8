"""On one GPU: a row-parallel W8A8 rank's kernels (each activation row's absmax given, the
max over the ranks' slices) round every activation as TP=1 does, and what the given
absmax costs at decode.

Checks, for fp8 and int8 weights on Llama-3-8B's o_proj and down_proj cut for TP=2 and
TP=4, at 1-16 rows (the skinny kernel) and more (quantize_rows, then torch._scaled_mm or
the tiled kernel): (1) quantize_rows of each rank's slice with the whole row's absmax
gives the whole row's codes and scales, bit for bit; (2) a given absmax equal to the
rows' own gives the very output of the call without it (every path); (3) each rank's
output equals the float64 reference of the same rounding; (4) the ranks' outputs summed
(the all-reduce) equal the unsplit layer's to bf16 rounding. Timing (CUDA graphs, µs a
call): the unchanged TP=1 call, and a TP=2 rank's call with and without the given absmax
(row_absmax + the kernel reading it; the all-reduce itself needs two GPUs).

Run on the GPU machine from the repository root (about a minute):
    PYTHONPATH=. python3 benchmarks/tp_w8a8_gpu_check.py --commit $(git rev-parse --short HEAD)
Prints one line per check and timing; writes benchmarks/results/<stamp>-tp-w8a8-check.json
(and $OUT); exits 1 when a check fails. ``--smoke`` runs the checks at small shapes on
the CPU under TRITON_INTERPRET=1 (no timing): the script itself, tested off the GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton

from lanner.bench.report import save_copies
from lanner.kernels import ops
from lanner.kernels import quant_reference as ref
from lanner.kernels import w8a8_matmul as w8a8
from lanner.kernels.quant_reference import FP8_DTYPE, FP8_MAX, INT8_MAX

RESULTS = Path(__file__).resolve().parent / "results"
# (name, N, K of the whole layer): Llama-3-8B's row-parallel projections.
LAYERS = [("o_proj", 4096, 4096), ("down_proj", 4096, 14336)]
ROWS = [1, 5, 16, 17, 64, 512]
SMOKE_LAYERS, SMOKE_ROWS = [("o_proj", 32, 128)], [3, 17]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QMAX = {FP8_DTYPE: FP8_MAX, torch.int8: INT8_MAX}


def operands(n: int, k: int, m: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    values = torch.randn(n, k, device=DEVICE, generator=generator)
    if dtype == torch.int8:
        weight = (values * 40).round().clamp(-127, 127).to(torch.int8)
    else:
        weight = (values * 60).clamp(-448, 448).to(FP8_DTYPE)
    weight_scale = torch.rand(n, device=DEVICE, generator=generator) * 1e-3 + 1e-4
    x = torch.randn(m, k, device=DEVICE, generator=generator).to(torch.bfloat16)
    # Outliers in one rank's slice only, as real activations have.
    x[:, k - 3] *= 30
    return weight, weight_scale, x


def check_one(layer: str, n: int, k: int, world: int, m: int, dtype: torch.dtype) -> dict:
    qmax = QMAX[dtype]
    weight, weight_scale, x = operands(n, k, m, dtype, seed=m + world)
    absmax = ops.row_absmax(x)
    step = k // world
    row = {"layer": layer, "world": world, "rows": m, "weight": str(dtype).split(".")[-1]}
    full = w8a8.w8a8_linear(x, weight, weight_scale, None, qmax)
    whole_codes, whole_scales = w8a8.quantize_rows(x, dtype, qmax)
    codes_equal, own_equal, worst_ref, summed = True, True, 0.0, None
    for rank in range(world):
        cols = slice(rank * step, (rank + 1) * step)
        x_r, w_r = x[:, cols].contiguous(), weight[:, cols].contiguous()
        codes, scales = w8a8.quantize_rows(x_r, dtype, qmax, absmax)
        codes_equal &= torch.equal(scales, whole_scales) and torch.equal(
            codes.view(torch.uint8), whole_codes[:, cols].view(torch.uint8)
        )
        out = w8a8.w8a8_linear(x_r, w_r, weight_scale, None, qmax, absmax)
        own = w8a8.w8a8_linear(x_r, w_r, weight_scale, None, qmax, ops.row_absmax(x_r))
        own_equal &= torch.equal(own, w8a8.w8a8_linear(x_r, w_r, weight_scale, None, qmax))
        expected = ref.w8a8_linear(
            x_r.double(), w_r, weight_scale, None, qmax, torch.float64, row_absmax=absmax
        )
        worst_ref = max(worst_ref, relative(out, expected))
        summed = out.float() if summed is None else summed + out.float()
    row.update(
        codes_equal=codes_equal,
        own_absmax_equal=own_equal,
        rank_vs_reference=worst_ref,
        sum_vs_unsplit=relative(summed, full),
    )
    # bf16 output rounding (2^-9) plus fp32 sums; the sum adds one rounding per rank.
    bound = world * 2**-8
    row["ok"] = codes_equal and own_equal and worst_ref < 2**-8 and row["sum_vs_unsplit"] < bound
    return row


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.double()
    return ((ours.double() - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30)).item()


def graph_us(call) -> float:
    return triton.testing.do_bench_cudagraph(call, rep=200, return_mode="median") * 1e3


def timing(layer: str, n: int, k: int, m: int, dtype: torch.dtype) -> dict:
    """µs a call at decode: TP=1's call (unchanged), and a TP=2 rank's call with its own
    absmax (what ranks did before: the wrong rounding) and with a given one (row_absmax
    and the kernel; the kernel alone)."""
    qmax = QMAX[dtype]
    weight, weight_scale, x = operands(n, k, m, dtype, seed=7)
    half, w_half = x[:, : k // 2].contiguous(), weight[:, : k // 2].contiguous()
    absmax = ops.row_absmax(x)

    def given() -> torch.Tensor:
        return w8a8.w8a8_linear(half, w_half, weight_scale, None, qmax, ops.row_absmax(half))

    return {
        "layer": layer,
        "rows": m,
        "weight": str(dtype).split(".")[-1],
        "tp1_us": graph_us(lambda: w8a8.w8a8_linear(x, weight, weight_scale, None, qmax)),
        "tp2_rank_own_absmax_us": graph_us(
            lambda: w8a8.w8a8_linear(half, w_half, weight_scale, None, qmax)
        ),
        "tp2_rank_given_absmax_us": graph_us(given),
        "given_absmax_kernel_only_us": graph_us(
            lambda: w8a8.w8a8_linear(half, w_half, weight_scale, None, qmax, absmax)
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--smoke", action="store_true", help="small shapes, no timing")
    args = parser.parse_args()
    layers, rows = (SMOKE_LAYERS, SMOKE_ROWS) if args.smoke else (LAYERS, ROWS)
    checks = []
    for dtype in (FP8_DTYPE, torch.int8):
        for layer, n, k in layers:
            for world in (2, 4):
                for m in rows:
                    row = check_one(layer, n, k, world, m, dtype)
                    checks.append(row)
                    print(
                        f"{'ok  ' if row['ok'] else 'FAIL'} {row['weight']:>13} {layer:9} "
                        f"TP={world} rows={m:3}: codes equal {row['codes_equal']}, own absmax "
                        f"equal {row['own_absmax_equal']}, rank vs ref "
                        f"{row['rank_vs_reference']:.2e}, sum vs unsplit "
                        f"{row['sum_vs_unsplit']:.2e}"
                    )
    timings = [
        timing(layer, n, k, m, dtype)
        for dtype in (FP8_DTYPE, torch.int8)
        for m in (1, 8)
        for layer, n, k in ([] if args.smoke else LAYERS)
    ]
    for t in timings:
        print(
            f"{t['weight']:>13} {t['layer']:9} rows={t['rows']}: TP=1 {t['tp1_us']:.2f} us; "
            f"TP=2 rank own absmax {t['tp2_rank_own_absmax_us']:.2f}, given "
            f"{t['tp2_rank_given_absmax_us']:.2f} (kernel alone "
            f"{t['given_absmax_kernel_only_us']:.2f})"
        )
    failed = [c for c in checks if not c["ok"]]
    result = {
        "workload": "tp-w8a8-check",
        "commit": args.commit,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "checks": checks,
        "timing_us": timings,
        "failed": len(failed),
    }
    if not args.smoke:
        save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-tp-w8a8-check.json")
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
