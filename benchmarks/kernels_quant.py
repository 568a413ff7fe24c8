"""`kernels_linear.py --quant`: GPU check and timing of the quantized linears at the
llama3-8b (and qwen3-0.6b) projections and LM head, against bf16 cuBLAS and the bf16
skinny kernel on the same shape.

Methods: fp8 and int8 (per-channel scales), int4 (group 128 symmetric; ``int4-g32z`` and
the like pick the group and zero points). Per shape and M: every path's relative error
against the pure-torch reference (kernels/quant_reference.py, fp32), bitwise batch
invariance of the decode rows, and graph-replay time with the weights cycling through
copies so that each call reads HBM. Paths:
- M <= 16: ``skinny`` (what the model runs: skinny_matmul_w8 quantizing the rows in the
  kernel, W8A8; skinny_matmul_w4, W4A16), for fp8/int8 ``skinny-w8a16`` (the same kernel
  without activation rounding: what the in-kernel quantization costs) and for fp8
  ``quantize+scaled_mm`` (W8A8 through quantize_rows + cuBLAS, a launch more).
- M > 16: fp8 quantize_rows + torch._scaled_mm (what the model runs) and the tiled Triton
  kernel; int8 the tiled kernel; int4 the tiled kernel and dequantize + cuBLAS.
floor = (weight bytes as stored, with scales, + x + out) / the copy bandwidth measured in
the same call; share = floor / time; ``pred_us`` is the floor at 4.2 TB/s.

Then the W1 (batch 1) linears of a token: 32 x (qkv + o + gate_up + down) + lm_head at
M = 1 for bf16 cuBLAS, bf16 skinny and each method's skinny kernel, against their floors.

--sweep times the candidate configs of SKINNY_SWEEP at M = 1 and 8 (decode; the best of
them again with each split-K), most important shapes first, within --sweep-budget-s;
prints the best per shape and writes them, where they beat choose_config's rule by over
3 %, to --tuned-out (JSON that engine_workloads.py --skinny-configs installs), so one GPU
call both finds and measures them. int4 also times the tiled kernel's tiles at M = 512
and 2048 against dequantize + cuBLAS (the DEQUANT_MIN_M crossover).

    PYTHONPATH=. python3 benchmarks/kernels_linear.py --quant fp8,int4 --commit X
        [--sweep] [--sweep-budget-s 80] [--tuned-out FILE] [--shapes llama3-8b:qkv,...]
        [--quant-rows 1,8,512]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.kernels_linear import RESULTS, ROTATE_BYTES, SHAPES, graph_us, relative_error
from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import quant_reference as ref
from lanner.kernels import skinny_matmul, w4a16_matmul, w8a8_matmul
from lanner.model.quant.w8a8 import quantize_per_channel

DTYPE = torch.bfloat16
DEVICE = "cuda"
PREDICTION_BANDWIDTH = 4.2e12
# fp8/int8 W8A8 round each activation to 3 or 7 bits of mantissa (the kernels and the
# reference alike); W8A16/W4A16 round nothing but the output: bf16 rounding and fp32 sums.
MAX_RELATIVE_ERROR = 2e-2
# Decode candidates (skinny_matmul launch parameters; split_k None: choose_config's rule).
# fp8/int8: elementwise products (what M = 1 runs by default) and the dot path (M = 2-16).
_W8_ELEMENTWISE = [(8, 1024, 4, 4), (16, 512, 4, 4), (4, 1024, 4, 6), (16, 1024, 8, 3)]
_W8_DOT = [(128, 256, 4, 3), (64, 256, 4, 4), (128, 512, 8, 3), (32, 512, 2, 4), (256, 128, 8, 3)]
# int4 (group 128): block_k codes a step (four planes of block_k / 4 words).
_INT4 = [
    (64, 512, 4, 3),
    (32, 512, 4, 3),
    (16, 512, 2, 4),
    (128, 512, 8, 3),
    (64, 256, 4, 4),
    (32, 256, 4, 4),
    (64, 512, 4, 4),
    (128, 256, 4, 3),
]
SKINNY_SWEEP = {
    "fp8": [
        dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, use_dot=False)
        for bn, bk, w, st in _W8_ELEMENTWISE
    ]
    + [
        dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, use_dot=True)
        for bn, bk, w, st in _W8_DOT
    ],
    "int4": [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st) for bn, bk, w, st in _INT4],
}
SPLITS = (1, 2, 4, 8, 16)
TILED_SWEEP = [
    dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (64, 128, 256, 8, 3),
        (128, 128, 256, 8, 3),
        (64, 128, 512, 8, 2),
        (128, 64, 256, 4, 3),
        (64, 256, 256, 8, 2),
    ]
]
# Sweep order: what a W1 token spends most on first.
SWEEP_ORDER = ("gate_up", "lm_head", "down", "qkv", "o")
W1_LAYERS = 32
# A sweep's best replaces choose_config's rule only when this much faster (timing noise).
TUNED_MIN_GAIN = 1.03


def parse_method(method: str) -> tuple[str, int, bool]:
    """'fp8', 'int8', 'int4' or 'int4-g<group>[z]' -> (kind, group, zero points)."""
    if method in ("fp8", "int8"):
        return method, 0, False
    if method == "int4":
        return "int4", 128, False
    if method.startswith("int4-g"):
        tail = method[len("int4-g") :]
        zero_points = tail.endswith("z")
        return "int4", int(tail.rstrip("z")), zero_points
    raise ValueError(f"--quant method {method!r}: use fp8, int8, int4 or int4-g<group>[z]")


class QuantWeights:
    """Copies of one quantized weight (enough bytes to defeat L2) and its bf16 twin."""

    def __init__(self, method: str, n: int, k: int) -> None:
        dense = (torch.randn(n, k, device=DEVICE) * k**-0.5).to(DTYPE)
        self.method, self.n, self.k = method, n, k
        self.kind, self.group, zero_points = parse_method(method)
        if self.kind in ("fp8", "int8"):
            dtype = torch.float8_e4m3fn if self.kind == "fp8" else torch.int8
            codes, scale = quantize_per_channel(dense, dtype)
            self.tensors = {"weight": codes, "weight_scale": scale}
            self.x_qmax = ref.FP8_MAX if self.kind == "fp8" else ref.INT8_MAX
        else:
            group = self.group
            grouped = dense.float().view(n, k // group, group)
            if zero_points:
                low, high = grouped.amin(-1), grouped.amax(-1)
                scales = ((high - low) / 15).clamp(min=1e-8)
                zeros = (-low / scales).round().clamp(0, 15)
                codes = (grouped / scales[..., None] + zeros[..., None]).round().clamp(0, 15)
                zero_codes = zeros.T.contiguous().to(torch.uint8)
            else:
                scales = (grouped.abs().amax(-1) / 7.5).clamp(min=1e-8)
                codes = (grouped / scales[..., None]).round().clamp(-8, 7) + 8
                zero_codes = None
            self.tensors = {
                "packed": ref.pack_int4(codes.to(torch.int64).view(n, k)),
                "scales": scales.T.contiguous().to(DTYPE),
            }
            if zero_codes is not None:
                self.tensors["zeros"] = zero_codes
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        count = max(1, math.ceil(ROTATE_BYTES / self.bytes))
        self.copies = [self.tensors] + [
            {name: t.clone() for name, t in self.tensors.items()} for _ in range(count - 1)
        ]
        count_dense = max(1, math.ceil(ROTATE_BYTES / dense.nbytes))
        self.dense = [dense] + [dense.clone() for _ in range(count_dense - 1)]

    def int4_args(self, t: dict) -> tuple:
        return t["packed"], t["scales"], t.get("zeros"), self.group

    def reference(self, x: torch.Tensor, path: str = "") -> torch.Tensor:
        t = self.tensors
        if self.kind == "int4":
            return ref.w4a16_linear(x, *self.int4_args(t), None)
        if path == "skinny-w8a16":
            return ref.w8a16_linear(x, t["weight"], t["weight_scale"], None)
        return ref.w8a8_linear(x, t["weight"], t["weight_scale"], None, self.x_qmax)

    def skinny(self, x: torch.Tensor, t: dict, **config) -> torch.Tensor:
        """The decode kernel the model runs for 1-16 rows (fp8/int8: W8A8, the rows
        quantized in the kernel)."""
        if self.kind == "int4":
            return skinny_matmul.skinny_matmul_w4(x, *self.int4_args(t), **config)
        return skinny_matmul.skinny_matmul_w8(
            x, t["weight"], t["weight_scale"], None, self.x_qmax, **config
        )

    def paths(self, m: int) -> dict:
        """name -> call(x, tensors) for the paths timed at m rows."""
        qmax = getattr(self, "x_qmax", 0.0)
        if m <= skinny_matmul.SKINNY_MAX_M:
            paths = {"skinny": self.skinny}
            if self.kind != "int4":
                paths["skinny-w8a16"] = lambda x, t: skinny_matmul.skinny_matmul_w8(
                    x, t["weight"], t["weight_scale"]
                )
            if self.kind == "fp8":
                paths["quantize+scaled_mm"] = lambda x, t: quantize_scaled_mm(x, t, qmax)
            return paths
        if self.kind == "int4":
            return {
                "tiled": lambda x, t, **c: w4a16_matmul.w4a16_matmul(x, *self.int4_args(t), **c),
                "dequant+cublas": lambda x, t: F.linear(
                    x, w4a16_matmul.dequantize_int4(*self.int4_args(t), self.k, DTYPE)
                ),
            }

        def tiled(x, t, **c):  # noqa: ANN001, ANN202
            codes, scales = w8a8_matmul.quantize_rows(x, t["weight"].dtype, qmax)
            return w8a8_matmul.w8a8_matmul(
                codes, scales, t["weight"], t["weight_scale"], None, DTYPE, **c
            )

        paths = {"quantize+tiled": tiled}
        if self.kind == "fp8":
            paths["quantize+scaled_mm"] = lambda x, t: w8a8_matmul.w8a8_linear(
                x, t["weight"], t["weight_scale"], None, qmax
            )
        return paths


def quantize_scaled_mm(x: torch.Tensor, t: dict, qmax: float) -> torch.Tensor:
    """W8A8 through cuBLAS at any M: quantize the rows, then torch._scaled_mm."""
    codes, scales = w8a8_matmul.quantize_rows(x, t["weight"].dtype, qmax)
    return torch._scaled_mm(
        codes,
        t["weight"].t(),
        scale_a=scales[:, None],
        scale_b=t["weight_scale"][None, :],
        out_dtype=DTYPE,
    )


def time_path(call, weights: QuantWeights, x: torch.Tensor, rep_ms: int, **config) -> float:
    """Median µs per call over the rotating copies (the graph_us of kernels_linear)."""
    copies = weights.copies
    wrapped = [lambda _w, t=t: call(x, t, **config) for t in copies]
    ms = triton.testing.do_bench_cudagraph(
        lambda: [f(None) for f in wrapped], rep=rep_ms, return_mode="median"
    )
    return ms * 1e3 / len(copies)


def moved_bytes(weights: QuantWeights, m: int) -> int:
    return weights.bytes + 2 * m * (weights.k + weights.n)


def measure(weights: QuantWeights, m: int, bandwidth: float, rep_ms: int) -> dict:
    x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
    moved = moved_bytes(weights, m)
    row = {
        "method": weights.method,
        "N": weights.n,
        "K": weights.k,
        "M": m,
        "weight_bytes": weights.bytes,
        "floor_us": moved / bandwidth * 1e6,
        "pred_us": moved / PREDICTION_BANDWIDTH * 1e6,
    }
    ok = True
    for name, call in weights.paths(m).items():
        out = call(x, weights.tensors)
        error = relative_error(out, weights.reference(x, name))
        invariant = None
        if 2 < m <= skinny_matmul.SKINNY_MAX_M and name == "skinny":
            # Against a 2-row call: M = 2-16 share one binary, a single row has its own.
            invariant = bool(torch.equal(out[1:2], call(x[0:2], weights.tensors)[1:2]))
        us = time_path(call, weights, x, rep_ms)
        ok = ok and error <= MAX_RELATIVE_ERROR and invariant is not False
        row[name] = {
            "relative_error": error,
            "batch_invariant": invariant,
            "us": us,
            "share_of_copy": row["floor_us"] / us,
        }
    row["bf16_cublas_us"] = graph_us(lambda w: F.linear(x, w), weights.dense, rep_ms)
    if m <= skinny_matmul.SKINNY_MAX_M:
        row["bf16_skinny_us"] = graph_us(
            lambda w: skinny_matmul.skinny_matmul(x, w), weights.dense, rep_ms
        )
    row["ok"] = ok
    fastest = min(v["us"] for v in row.values() if isinstance(v, dict))
    bf16 = min(row["bf16_cublas_us"], row.get("bf16_skinny_us", math.inf))
    row["speedup_over_bf16"] = bf16 / fastest
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    cells = [f"{row['method']:>8} {row['N']:>6}x{row['K']:<6} M={row['M']:<5}"]
    cells.append(f"pred {row['pred_us']:7.2f} us")
    for name, v in row.items():
        if isinstance(v, dict):
            flag = "" if v["relative_error"] <= MAX_RELATIVE_ERROR else " ERR"
            flag += " NOT-INVARIANT" if v["batch_invariant"] is False else ""
            cells.append(f"{name} {v['us']:8.2f} us ({v['share_of_copy']:.2f} of copy){flag}")
    bf16 = f"bf16 cuBLAS {row['bf16_cublas_us']:8.2f}"
    if "bf16_skinny_us" in row:
        bf16 += f" / skinny {row['bf16_skinny_us']:8.2f}"
    cells.append(f"{bf16} us -> x{row['speedup_over_bf16']:.2f}")
    return " | ".join(cells)


def w1_linear_summary(rows: list[dict], bandwidth: float) -> dict:
    """The linears of one W1 token (batch 1) from the M = 1 rows: 32 layers of qkv, o,
    gate_up and down plus the LM head, per path, against the floor. The LM head stays
    bf16 (the model keeps it in the model dtype), so every method counts it at the bf16
    skinny kernel's time."""
    per_layer = ("qkv", "o", "gate_up", "down")
    summary = {}
    singles = [r for r in rows if r["model"] == "llama3-8b" and r["M"] == 1]
    head = [r for r in singles if r["linear"] == "lm_head"]
    head_us = min((r["bf16_skinny_us"] for r in head), default=None)
    head_bytes = 2 * head[0]["N"] * head[0]["K"] if head else 0
    for method in sorted({r["method"] for r in singles}):
        found = {r["linear"]: r for r in singles if r["method"] == method}
        if not all(name in found for name in per_layer) or head_us is None:
            continue
        layers = [found[name] for name in per_layer]
        quant_us = W1_LAYERS * sum(r["skinny"]["us"] for r in layers) + head_us
        bf16_skinny_us = W1_LAYERS * sum(r["bf16_skinny_us"] for r in layers) + head_us
        cublas_us = W1_LAYERS * sum(r["bf16_cublas_us"] for r in layers) + head_us
        quant_bytes = W1_LAYERS * sum(r["weight_bytes"] for r in layers) + head_bytes
        bf16_bytes = W1_LAYERS * sum(2 * r["N"] * r["K"] for r in layers) + head_bytes
        summary[method] = {
            "linears_ms": quant_us / 1e3,
            "floor_ms": quant_bytes / bandwidth * 1e3,
            "pred_ms_at_4.2TBps": quant_bytes / PREDICTION_BANDWIDTH * 1e3,
            "share_of_copy": quant_bytes / bandwidth / (quant_us / 1e6),
            "bf16_skinny_ms": bf16_skinny_us / 1e3,
            "bf16_cublas_ms": cublas_us / 1e3,
            "bf16_floor_ms": bf16_bytes / bandwidth * 1e3,
            "speedup_over_bf16_skinny": bf16_skinny_us / quant_us,
        }
        s = summary[method]
        print(
            f"W1 linears a token, {method}: {s['linears_ms']:.3f} ms (floor {s['floor_ms']:.3f},"
            f" {s['share_of_copy']:.2f} of copy) | bf16 skinny {s['bf16_skinny_ms']:.3f} ms, "
            f"cuBLAS {s['bf16_cublas_ms']:.3f} ms (floor {s['bf16_floor_ms']:.3f}) -> "
            f"x{s['speedup_over_bf16_skinny']:.2f}",
            flush=True,
        )
    return summary


def sweep_decode(
    weights: QuantWeights, m: int, bandwidth: float, rep_ms: int, deadline: float
) -> dict | None:
    """The SKINNY_SWEEP candidates at m rows (the dot path only for m > 1), then the best
    with each split; the best config against choose_config's."""
    x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
    candidates = SKINNY_SWEEP["int4" if weights.kind == "int4" else "fp8"]
    if m > 1:
        candidates = [c for c in candidates if c.get("use_dot", True)]
    if weights.kind == "int4":
        step = 4 * min(ref.INT4_PLANE, weights.group)
        candidates = [c for c in candidates if c["block_k"] <= step]
    default_us = time_path(weights.skinny, weights, x, rep_ms)
    timed = []

    def attempt(config: dict) -> None:
        try:
            timed.append((time_path(weights.skinny, weights, x, rep_ms, **config), config))
        except Exception as error:  # out of resources and the like
            print(f"  {config}: {repr(error)[:100]}")

    for config in candidates:
        if time.monotonic() > deadline:
            break
        if config["block_k"] <= triton.next_power_of_2(weights.k):
            attempt(config)
    if not timed:
        return None
    _, best = min(timed, key=lambda t: t[0])
    for split_k in SPLITS:
        if time.monotonic() > deadline:
            break
        attempt({**best, "split_k": split_k})
    us, config = min(timed, key=lambda t: t[0])
    if "split_k" not in config:  # the split choose_config's rule gives these tiles
        names = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "use_dot")
        plan = skinny_matmul._plan(
            m,
            weights.n,
            weights.k,
            weights_format(weights),
            weights.group,
            *(config.get(name) for name in names),
            None,
        )
        config = {**config, "split_k": plan.grid[1]}
    floor = moved_bytes(weights, m) / bandwidth * 1e6
    result = {
        "method": weights.method,
        "N": weights.n,
        "K": weights.k,
        "M": m,
        "config": config,
        "us": us,
        "share_of_copy": floor / us,
        "default_us": default_us,
        "default_share_of_copy": floor / default_us,
        "configs_tried": len(timed),
    }
    print(
        f"  best {weights.method} {weights.n}x{weights.k} M={m}: {config} {us:.2f} us "
        f"({floor / us:.2f} of copy); choose_config {default_us:.2f} us "
        f"({floor / default_us:.2f})",
        flush=True,
    )
    return result


def weights_format(weights: QuantWeights) -> str:
    return {"fp8": skinny_matmul.FP8, "int8": skinny_matmul.INT8, "int4": skinny_matmul.INT4}[
        weights.kind
    ]


def sweep_tiled_int4(weights: QuantWeights, rep_ms: int, deadline: float) -> list[dict]:
    best = []
    for m in (512, 2048):
        if time.monotonic() > deadline:
            break
        x = torch.randn(m, weights.k, device=DEVICE).to(DTYPE)
        paths = weights.paths(m)
        timed = [(time_path(paths["tiled"], weights, x, rep_ms, **c), c) for c in TILED_SWEEP]
        dequant_us = time_path(paths["dequant+cublas"], weights, x, rep_ms)
        us, config = min(timed, key=lambda t: t[0])
        best.append(
            {
                "method": weights.method,
                "N": weights.n,
                "K": weights.k,
                "M": m,
                "config": config,
                "us": us,
                "dequant_cublas_us": dequant_us,
            }
        )
        print(
            f"  best int4 tiled {weights.n}x{weights.k} M={m}: {config} {us:.2f} us; "
            f"dequantize + cuBLAS {dequant_us:.2f} us",
            flush=True,
        )
    return best


def tuned_configs(best: list[dict]) -> list[dict]:
    """Sweep results that beat choose_config by TUNED_MIN_GAIN, as the JSON entries
    engine_workloads.py --skinny-configs installs (M = 8 stands for 2-16)."""
    entries = []
    for b in best:
        if "default_us" not in b or b["default_us"] < TUNED_MIN_GAIN * b["us"]:
            continue
        kind, _, _ = parse_method(b["method"])
        entries.append(
            {
                "format": kind,
                "rows": 1 if b["M"] == 1 else skinny_matmul.MAX_BLOCK_M,
                "N": b["N"],
                "K": b["K"],
                "config": b["config"],
                "gain": b["default_us"] / b["us"],
            }
        )
    return entries


def install_tuned(path: str) -> int:
    """Installs a --tuned-out file's configs into skinny_matmul; returns how many."""
    entries = json.loads(Path(path).read_text())
    configs = {
        (e["format"], e["rows"], e["N"], e["K"]): skinny_matmul.SkinnyConfig(**e["config"])
        for e in entries
    }
    skinny_matmul.install_tuned_configs(configs)
    return len(configs)


def quant_main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    started = time.monotonic()
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    wanted = {s for s in args.shapes.split(",") if s} or {
        f"llama3-8b:{name}" for name in SWEEP_ORDER
    }
    shapes = [
        (model, name, n, k)
        for model, linears in SHAPES.items()
        for name, (n, k) in sorted(
            linears.items(),
            key=lambda item: SWEEP_ORDER.index(item[0]) if item[0] in SWEEP_ORDER else 99,
        )
        if f"{model}:{name}" in wanted
    ]
    rows_list = [int(m) for m in args.quant_rows.split(",")]
    rows, best = [], []
    for method in args.quant.split(","):
        parse_method(method)
    # Measurements first, for every method and shape; the sweep gets what time is left.
    for method in args.quant.split(","):
        for model, name, n, k in shapes:
            weights = QuantWeights(method, n, k)
            for m in rows_list:
                rows.append(
                    {"model": model, "linear": name, **measure(weights, m, bandwidth, args.rep_ms)}
                )
            del weights
            torch.cuda.empty_cache()
    w1 = w1_linear_summary(rows, bandwidth)
    if args.sweep:
        deadline = time.monotonic() + args.sweep_budget_s
        sweep_rep = max(5, args.rep_ms // 3)
        # Group 128 symmetric stands for every int4 method (the kernel's steps are the same).
        for method in dict.fromkeys(
            "int4" if parse_method(m)[0] == "int4" else m for m in args.quant.split(",")
        ):
            for model, _, n, k in shapes:
                if time.monotonic() > deadline:
                    break
                weights = QuantWeights(method, n, k)
                for m in (1, 8):
                    found = sweep_decode(weights, m, bandwidth, sweep_rep, deadline)
                    if found:
                        best.append({"model": model, **found})
                if weights.kind == "int4" and args.sweep_tiled:
                    best += sweep_tiled_int4(weights, sweep_rep, deadline)
                del weights
                torch.cuda.empty_cache()
    tuned = tuned_configs(best)
    if args.tuned_out:
        Path(args.tuned_out).write_text(json.dumps(tuned, indent=1))
        print(f"{len(tuned)} tuned configs -> {args.tuned_out}")
    crossover = {}
    for b in best:
        if "dequant_cublas_us" in b and b["dequant_cublas_us"] < b["us"]:
            crossover.setdefault(f"{b['N']}x{b['K']}", b["M"])
    result = {
        "workload": "kernels-quant-linear",
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/kernels_linear.py " + " ".join(sys.argv[1:]),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rows": rows,
        "w1_linears": w1,
        "sweep_best": best,
        "tuned_configs": tuned,
        "dequant_cublas_faster_from_m": crossover,
        "wall_s": time.monotonic() - started,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-kernels-quant-linear.json")
    failed = [f"{r['method']} {r['linear']} M={r['M']}" for r in rows if not r["ok"]]
    print(
        f"card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, wall {result['wall_s']:.0f} s"
    )
    if crossover:
        print(f"dequantize + cuBLAS beat the tiled int4 kernel from M = {crossover}")
    print("all checks passed" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0
