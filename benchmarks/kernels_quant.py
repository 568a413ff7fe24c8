"""`kernels_linear.py --quant`: GPU check and timing of the quantized linears at the
llama3-8b (and qwen3-0.6b) projections: W8A8 fp8 and int8 (lanner/kernels/w8a8_matmul.py)
and W4A16 int4 group 128 (lanner/kernels/w4a16_matmul.py), against bf16 cuBLAS on the
same shape.

Per shape and M: every path's relative error against the pure-torch reference
(kernels/quant_reference.py, fp32), bitwise batch invariance of the decode rows, and
graph-replay time with the weights cycling through copies so that each call reads HBM.
Paths: fp8/int8 decode = the skinny kernel; fp8 M > 16 = quantize_rows + torch._scaled_mm
(what ops.w8a8_linear picks) and the tiled Triton kernel (the alternative); int8 M > 16 =
the tiled kernel; int4 = the fused kernel, and for M > 16 also dequantize + cuBLAS (the
DEQUANT_MIN_M switch). floor = (weight bytes as stored, with scales, + x + out) / the
copy bandwidth measured in the same call; share = floor / time.

--sweep also times a grid of launch configs per shape at M = 1 and 8 (decode) and, for int4,
the prefill tiles at M = 512 and 2048 against dequantize + cuBLAS, printing the best per
shape as rows for the kernels' choose_config and the smallest M where dequantize + cuBLAS
wins (DEQUANT_MIN_M).

    PYTHONPATH=. python3 benchmarks/kernels_linear.py --quant fp8,int8,int4 --commit X
        [--sweep] [--sweep-budget-s 150] [--shapes llama3-8b:qkv,...] [--quant-rows 1,8,512]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
import triton

from benchmarks.kernels_linear import RESULTS, ROTATE_BYTES, SHAPES, graph_us, relative_error
from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import quant_reference as ref
from lanner.kernels import w4a16_matmul, w8a8_matmul
from lanner.model.quant.w8a8 import quantize_per_channel

DTYPE = torch.bfloat16
DEVICE = "cuda"
GROUP = 128
# fp8/int8 round each activation to 3 or 7 bits of mantissa; the kernels and the
# reference round identically, so what is left is bf16 output rounding and fp32 sums.
MAX_RELATIVE_ERROR = 2e-2
SKINNY_SWEEP = {
    "w8a8": [
        dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bn, bk, w, st in [
            (16, 256, 4, 4),
            (16, 512, 4, 4),
            (32, 256, 4, 4),
            (32, 512, 4, 3),
            (64, 256, 4, 3),
            (64, 128, 4, 4),
            (16, 1024, 4, 3),
            (32, 128, 2, 6),
        ]
    ],
    "w4a16": [
        dict(block_n=bn, num_warps=w, num_stages=st)
        for bn, w, st in [
            (16, 2, 4),
            (16, 4, 6),
            (32, 4, 4),
            (32, 4, 6),
            (64, 4, 4),
            (64, 8, 4),
            (128, 8, 3),
            (32, 2, 8),
        ]
    ],
}
SPLITS = (1, 2, 4, 8)
TILED_SWEEP = [
    dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
    for bm, bn, w, st in [
        (64, 128, 4, 3),
        (128, 128, 8, 3),
        (128, 64, 4, 4),
        (128, 256, 8, 2),
        (64, 256, 8, 3),
    ]
]


class QuantWeights:
    """Copies of one quantized weight (enough bytes to defeat L2) and its bf16 twin."""

    def __init__(self, method: str, n: int, k: int) -> None:
        dense = (torch.randn(n, k, device=DEVICE) * k**-0.5).to(DTYPE)
        self.method, self.n, self.k = method, n, k
        if method in ("fp8", "int8"):
            dtype = torch.float8_e4m3fn if method == "fp8" else torch.int8
            codes, scale = quantize_per_channel(dense, dtype)
            self.tensors = {"weight": codes, "weight_scale": scale}
            self.x_qmax = ref.FP8_MAX if method == "fp8" else ref.INT8_MAX
        else:
            absmax = dense.float().view(n, k // GROUP, GROUP).abs().amax(-1).clamp(min=1e-8)
            scales = absmax / 7.5
            codes = (dense.float().view(n, k // GROUP, GROUP) / scales[..., None]).round()
            codes = codes.clamp(-8, 7).to(torch.int64).view(n, k) + 8
            self.tensors = {
                "packed": ref.pack_int4(codes),
                "scales": scales.T.contiguous().to(DTYPE),
            }
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        count = max(1, math.ceil(ROTATE_BYTES / self.bytes))
        self.copies = [self.tensors] + [
            {name: t.clone() for name, t in self.tensors.items()} for _ in range(count - 1)
        ]
        count_dense = max(1, math.ceil(ROTATE_BYTES / dense.nbytes))
        self.dense = [dense] + [dense.clone() for _ in range(count_dense - 1)]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        if self.method == "int4":
            return ref.w4a16_linear(x, t["packed"], t["scales"], None, GROUP, None)
        return ref.w8a8_linear(x, t["weight"], t["weight_scale"], None, self.x_qmax)

    def paths(self, m: int) -> dict:
        """name -> call(x, tensors) for the paths timed at m rows."""
        if self.method == "int4":
            paths = {
                "fused": lambda x, t, **c: w4a16_matmul.w4a16_matmul(
                    x, t["packed"], t["scales"], None, GROUP, **c
                )
            }
            if m > 16:
                paths["dequant+cublas"] = lambda x, t: F.linear(
                    x,
                    w4a16_matmul.dequantize_int4(
                        t["packed"], t["scales"], None, GROUP, self.k, DTYPE
                    ),
                )
            return paths
        qmax = self.x_qmax
        if m <= 16:
            return {
                "skinny": lambda x, t, **c: w8a8_matmul.w8a8_matmul(
                    x, t["weight"], t["weight_scale"], None, qmax, **c
                )
            }

        def tiled(x, t, **c):  # noqa: ANN001, ANN202
            codes, scales = w8a8_matmul.quantize_rows(x, t["weight"].dtype, qmax)
            return w8a8_matmul.w8a8_matmul(
                codes,
                t["weight"],
                t["weight_scale"],
                None,
                qmax,
                x_scale=scales,
                out_dtype=DTYPE,
                **c,
            )

        paths = {"quantize+tiled": tiled}
        if self.method == "fp8":
            paths["quantize+scaled_mm"] = lambda x, t: w8a8_matmul.w8a8_linear(
                x, t["weight"], t["weight_scale"], None, qmax
            )
        return paths


def time_path(call, weights: QuantWeights, x: torch.Tensor, rep_ms: int, **config) -> float:
    """Median µs per call over the rotating copies (the graph_us of kernels_linear)."""
    copies = weights.copies
    wrapped = [lambda _w, t=t: call(x, t, **config) for t in copies]
    ms = triton.testing.do_bench_cudagraph(
        lambda: [f(None) for f in wrapped], rep=rep_ms, return_mode="median"
    )
    return ms * 1e3 / len(copies)


def floor_us(weights: QuantWeights, m: int, bandwidth: float) -> float:
    moved = weights.bytes + 2 * m * (weights.k + weights.n)
    return moved / bandwidth * 1e6


def measure(weights: QuantWeights, m: int, bandwidth: float, rep_ms: int) -> dict:
    x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
    expected = weights.reference(x)
    row = {
        "method": weights.method,
        "N": weights.n,
        "K": weights.k,
        "M": m,
        "weight_bytes": weights.bytes,
        "floor_us": floor_us(weights, m, bandwidth),
    }
    ok = True
    for name, call in weights.paths(m).items():
        out = call(x, weights.tensors)
        error = relative_error(out, expected)
        invariant = None
        if m > 1 and m <= 16:
            invariant = bool(torch.equal(out[1:2], call(x[1:2], weights.tensors)))
        us = time_path(call, weights, x, rep_ms)
        ok = ok and error <= MAX_RELATIVE_ERROR and invariant is not False
        row[name] = {
            "relative_error": error,
            "batch_invariant": invariant,
            "us": us,
            "share_of_copy": row["floor_us"] / us,
        }
    dense_us = graph_us(lambda w: F.linear(x, w), weights.dense, rep_ms)
    row["bf16_cublas_us"] = dense_us
    row["ok"] = ok
    fastest = min(v["us"] for v in row.values() if isinstance(v, dict))
    row["speedup_over_bf16"] = dense_us / fastest
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    cells = [f"{row['method']:>5} {row['N']:>6}x{row['K']:<6} M={row['M']:<5}"]
    for name, v in row.items():
        if isinstance(v, dict):
            flag = "" if v["relative_error"] <= MAX_RELATIVE_ERROR else " ERR"
            flag += " NOT-INVARIANT" if v["batch_invariant"] is False else ""
            cells.append(f"{name} {v['us']:8.2f} us ({v['share_of_copy']:.2f} of copy){flag}")
    cells.append(f"bf16 cuBLAS {row['bf16_cublas_us']:8.2f} us -> x{row['speedup_over_bf16']:.2f}")
    return " | ".join(cells)


def sweep_shape(weights: QuantWeights, bandwidth: float, rep_ms: int, deadline: float) -> list:
    """Decode configs at M = 1 and 8, split-K on the best; int4 prefill tiles vs dequant."""
    best = []
    kind = "w4a16" if weights.method == "int4" else "w8a8"
    for m in (1, 8):
        if time.monotonic() > deadline:
            break
        x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
        [call] = [c for name, c in weights.paths(m).items() if name in ("fused", "skinny")]
        timed = []
        for config in SKINNY_SWEEP[kind]:
            if time.monotonic() > deadline:
                break
            if config.get("block_k", 0) > triton.next_power_of_2(weights.k):
                continue
            for split_k in SPLITS:
                try:
                    us = time_path(call, weights, x, rep_ms, **config, split_k=split_k)
                except Exception as error:  # out of resources and the like
                    print(f"  {config} split {split_k}: {repr(error)[:100]}")
                    continue
                timed.append((us, {**config, "split_k": split_k}))
        if timed:
            us, config = min(timed, key=lambda t: t[0])
            share = floor_us(weights, m, bandwidth) / us
            best.append(
                {
                    "method": weights.method,
                    "N": weights.n,
                    "K": weights.k,
                    "M": m,
                    "config": config,
                    "us": us,
                    "share_of_copy": share,
                    "configs_tried": len(timed),
                }
            )
            print(
                f"  best {weights.method} {weights.n}x{weights.k} M={m}: {config} "
                f"{us:.2f} us ({share:.2f} of copy)",
                flush=True,
            )
    if weights.method == "int4":
        for m in (512, 2048):
            if time.monotonic() > deadline:
                break
            x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
            paths = weights.paths(m)
            timed = [(time_path(paths["fused"], weights, x, rep_ms, **c), c) for c in TILED_SWEEP]
            dequant_us = time_path(paths["dequant+cublas"], weights, x, rep_ms)
            us, config = min(timed, key=lambda t: t[0])
            best.append(
                {
                    "method": "int4",
                    "N": weights.n,
                    "K": weights.k,
                    "M": m,
                    "config": config,
                    "us": us,
                    "dequant_cublas_us": dequant_us,
                }
            )
            print(
                f"  best int4 {weights.n}x{weights.k} M={m}: {config} {us:.2f} us; dequantize"
                f" + cuBLAS {dequant_us:.2f} us",
                flush=True,
            )
    return best


def quant_main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    started = time.monotonic()
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    wanted = {s for s in args.shapes.split(",") if s} or {
        f"llama3-8b:{name}" for name in ("qkv", "o", "gate_up", "down")
    }
    shapes = [
        (model, name, n, k)
        for model, linears in SHAPES.items()
        for name, (n, k) in linears.items()
        if f"{model}:{name}" in wanted
    ]
    rows_list = [int(m) for m in args.quant_rows.split(",")]
    rows, best = [], []
    deadline = time.monotonic() + args.sweep_budget_s
    for method in args.quant.split(","):
        for model, name, n, k in shapes:
            weights = QuantWeights(method, n, k)
            for m in rows_list:
                rows.append(
                    {"model": model, "linear": name, **measure(weights, m, bandwidth, args.rep_ms)}
                )
            if args.sweep:
                best += sweep_shape(weights, bandwidth, max(5, args.rep_ms // 2), deadline)
            del weights
            torch.cuda.empty_cache()
    crossover = {}
    for b in best:
        if "dequant_cublas_us" in b and b["dequant_cublas_us"] < b["us"]:
            crossover.setdefault(f"{b['N']}x{b['K']}", b["M"])
    result = {
        "workload": "kernels-quant-linear",
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/kernels_linear.py "
        + " ".join(__import__("sys").argv[1:]),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "int4_group_size": GROUP,
        "rows": rows,
        "sweep_best": best,
        "dequant_cublas_faster_from_m": crossover,
        "wall_s": time.monotonic() - started,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-kernels-quant-linear.json")
    failed = [f"{r['method']} {r['linear']} M={r['M']}" for r in rows if not r["ok"]]
    print(
        f"card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, wall {result['wall_s']:.0f} s"
    )
    if crossover:
        print(f"dequantize + cuBLAS beat the fused int4 kernel from M = {crossover}")
    print("all checks passed" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0
