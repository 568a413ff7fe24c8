"""GPU sweep of the tiled W4A16 kernel's tiles at batch rows (W4's decode steps of 256
requests, and prefill chunks), against dequantize + cuBLAS and bf16 cuBLAS on the same
shapes: where the tiled kernel loses, and from how many rows dequantize + cuBLAS wins
(w4a16_matmul.DEQUANT_MIN_M).

    PYTHONPATH=. python3 benchmarks/tiled_int4_sweep.py --commit X [--rows 256,1024,8192]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.kernels_linear import SHAPES
from benchmarks.kernels_quant import DTYPE, TILED_SWEEP, QuantWeights, time_path
from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import w4a16_matmul

# Tiles beyond kernels_quant's TILED_SWEEP: larger x tiles for a few hundred rows.
EXTRA = [
    dict(block_m=128, block_n=256, block_k=256, num_warps=8, num_stages=2),
    dict(block_m=256, block_n=128, block_k=256, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=128, block_k=256, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=128, block_k=512, num_warps=8, num_stages=2),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--rows", default="256,1024,8192")
    parser.add_argument("--rep-ms", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    rows = [int(m) for m in args.rows.split(",")]
    results = []
    started = time.monotonic()
    for name, (n, k) in SHAPES["llama3-8b"].items():
        weights = QuantWeights("int4", n, k)
        paths = weights.paths(max(rows))
        for m in rows:
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            default = w4a16_matmul.choose_config(m, n, k)
            timed = []
            for config in [None, *TILED_SWEEP, *EXTRA]:
                try:
                    us = time_path(paths["tiled"], weights, x, args.rep_ms, **(config or {}))
                except Exception as err:  # a tile that does not fit in shared memory
                    print(f"  {name} M={m} {config}: failed ({str(err)[:120]})")
                    continue
                timed.append((us, config or "default"))
            dequant_us = time_path(paths["dequant+cublas"], weights, x, args.rep_ms)
            dense = weights.dense[0]
            bf16_us = time_path(lambda x, _t, w=dense: F.linear(x, w), weights, x, args.rep_ms)
            best_us, best = min(timed, key=lambda t: t[0])
            default_us = next(us for us, c in timed if c == "default")
            flops = 2 * m * n * k
            row = {
                "linear": name,
                "N": n,
                "K": k,
                "M": m,
                "default_config": default.__dict__,
                "default_us": default_us,
                "best_config": best,
                "best_us": best_us,
                "dequant_cublas_us": dequant_us,
                "bf16_cublas_us": bf16_us,
                "best_tflops": flops / best_us / 1e6,
                "bf16_tflops": flops / bf16_us / 1e6,
            }
            results.append(row)
            print(
                f"{name:8} {n:>6}x{k:<6} M={m:<5} default {default_us:8.1f} us | best "
                f"{best_us:8.1f} us {best} | dequant+cuBLAS {dequant_us:8.1f} | bf16 cuBLAS "
                f"{bf16_us:8.1f} us ({row['bf16_tflops']:.0f} TFLOP/s)",
                flush=True,
            )
        del weights
        torch.cuda.empty_cache()
    result = {
        "workload": "tiled-int4-sweep",
        "card": card,
        "commit": args.commit,
        "command": f"PYTHONPATH=. python3 benchmarks/tiled_int4_sweep.py --rows {args.rows}",
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "triton": triton.__version__,
        "rows": results,
        "wall_s": time.monotonic() - started,
    }
    name = time.strftime("%Y%m%d-%H%M%S") + "-tiled-int4.json"
    save_copies(result, Path("benchmarks/results"), name)


if __name__ == "__main__":
    main()
