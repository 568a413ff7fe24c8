"""GPU check and timing of the Triton skinny matmul (lanner/kernels/skinny_matmul.py)
against torch.nn.functional.linear (cuBLAS) at the decode linears of qwen3-0.6b and
llama3-8b (qkv, o, gate_up, down, lm_head), M = 1, 2, 4, 8, 16 rows, bf16; with --quant,
the quantized linears instead (see quant_main below: W8A8 fp8/int8 and W4A16 int4).

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/kernels_linear.py --commit $(git rev-parse HEAD) [--sweep]
    PYTHONPATH=. python3 benchmarks/kernels_linear.py --quant fp8,int8,int4 [--sweep]
Every case is checked against F.linear (relative error, bf16 tolerance), for bitwise batch
invariance (each row of the M-row call against a 2-row call on that row, same config)
and, with split-K, for run-to-run determinism (50 launches bit-equal). Both are timed with
triton.testing.do_bench_cudagraph (graph replay, like a decode step) over enough weight
copies (ROTATE_BYTES in all) that each call reads its weight from HBM, not L2, as in a real
decode step; the floor is bytes moved over the measured copy bandwidth. --sweep also
times a grid of configs at M = 1 and 8 (tiles first, then split-K on the best tile) and
prints the best per shape, for choose_config. Writes one JSON to benchmarks/results/ (and
$OUT when set); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels.skinny_matmul import (
    NUM_SMS,
    choose_config,
    default_split_k,
    skinny_matmul,
)

RESULTS = Path(__file__).resolve().parent / "results"

# (N, K) of each decode linear: weight [N, K] (benchmarks/shapes/*/config.json).
SHAPES = {
    "qwen3-0.6b": {
        "qkv": (4096, 1024),
        "o": (1024, 2048),
        "gate_up": (6144, 1024),
        "down": (1024, 3072),
        "lm_head": (151936, 1024),
    },
    "llama3-8b": {
        "qkv": (6144, 4096),
        "o": (4096, 4096),
        "gate_up": (28672, 4096),
        "down": (4096, 14336),
        "lm_head": (128256, 4096),
    },
}
DTYPE = torch.bfloat16
# Weight copies cycled through per timed call: about 4x an H100's 50 MB L2.
ROTATE_BYTES = 192 << 20
# bf16 rounds each output once (both sides): at most about one ulp (2^-8 relative) apart.
MAX_RELATIVE_ERROR = 1.6e-2
DETERMINISM_LAUNCHES = 50

# Sweep: (block_n, block_k, num_warps, num_stages, use_dot), each at default_split_k, then
# split-K on the best of them. Kept short: each new config compiles in about 0.5 s.
SWEEP_TILES = [
    (16, 128, 1, 8, True),
    (16, 256, 2, 4, True),
    (16, 256, 2, 6, True),
    (16, 512, 2, 3, True),
    (16, 512, 4, 4, True),
    (32, 128, 2, 6, True),
    (32, 256, 4, 4, True),
    (32, 256, 2, 4, True),
    (32, 512, 4, 3, True),
    (64, 128, 4, 4, True),
    (64, 256, 4, 3, True),
    (64, 256, 8, 3, True),
]
# The elementwise inner product keeps fp32 products of every row in registers: M <= 2.
SWEEP_ELEMENTWISE_TILES = [
    (8, 1024, 4, 4, False),
    (16, 512, 4, 4, False),
    (4, 1024, 4, 6, False),
]
SWEEP_SPLITS = (1, 2, 4, 8)
SWEEP_ROWS = (1, 8)
SHARED_MEMORY_LIMIT = 227 << 10  # per block on sm_90


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    base = (torch.randn(n, k, device="cuda") * k**-0.5).to(DTYPE)
    copies = max(1, math.ceil(ROTATE_BYTES / base.nbytes))
    return [base] + [base.clone() for _ in range(copies - 1)]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp(min=1e-6)
    return ((out.float() - expected.float()).abs().max() / scale).item()


def check(x: torch.Tensor, weight: torch.Tensor, config: dict) -> dict:
    """Against F.linear; batch invariance for M > 1; determinism for split-K."""
    out = skinny_matmul(x, weight, **config)
    error = relative_error(out, F.linear(x, weight))
    ok = out.shape == (x.shape[0], weight.shape[0]) and error <= MAX_RELATIVE_ERROR
    invariant = None
    if x.shape[0] > 1:
        # Against a 2-row call: the default config gives 1 row its own kernel.
        invariant = all(
            torch.equal(out[row], skinny_matmul(x[[row, row]], weight, **config)[0])
            for row in range(x.shape[0])
        )
    deterministic = None
    if config.get("split_k", 1) > 1:
        deterministic = all(
            torch.equal(out, skinny_matmul(x, weight, **config))
            for _ in range(DETERMINISM_LAUNCHES)
        )
    ok = ok and invariant is not False and deterministic is not False
    return {
        "ok": bool(ok),
        "relative_error": error,
        "batch_invariant": invariant,
        "deterministic": deterministic,
    }


def graph_us(call, weights: list[torch.Tensor], rep_ms: int) -> float:
    """Median µs of one call, replayed from a CUDA graph that cycles through the copies."""
    ms = triton.testing.do_bench_cudagraph(
        lambda: [call(weight) for weight in weights], rep=rep_ms, return_mode="median"
    )
    return ms * 1e3 / len(weights)


def eager_us(call, weight: torch.Tensor, repeats: int = 100) -> float:
    """Wall µs per call launched from Python back to back: the host launch cost where the
    kernel is shorter than it (small shapes), else the kernel time."""
    call(weight)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        call(weight)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1e6


def bytes_moved(m: int, n: int, k: int) -> int:
    return (n * k + m * k + m * n) * torch.finfo(DTYPE).bits // 8


def config_label(config: dict) -> str:
    path = "dot" if config["use_dot"] else "ew"
    fused = "" if config["split_k"] == 1 else ("+fused" if config["fused_reduce"] else "+kernel")
    return (
        f"{path} n{config['block_n']} k{config['block_k']} s{config['split_k']}{fused}"
        f" w{config['num_warps']} st{config['num_stages']}"
    )


def main_rows(shapes, rows_list, bandwidth: float, rep_ms: int, weights_for) -> list[dict]:
    rows = []
    for model, name, n, k in shapes:
        weights = weights_for(n, k)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            config = dataclasses.asdict(choose_config(m, n, k))
            checked = check(x, weights[0], config)
            # The M-row call's rows against the default 1-row call (differs only where
            # choose_config gives M = 1 another config).
            single = skinny_matmul(x[:1], weights[0])
            matches_default_m1 = bool(torch.equal(skinny_matmul(x, weights[0])[:1], single))
            skinny_us = graph_us(lambda w, x=x: skinny_matmul(x, w), weights, rep_ms)
            cublas_us = graph_us(lambda w, x=x: F.linear(x, w), weights, rep_ms)
            floor_us = bytes_moved(m, n, k) / bandwidth * 1e6
            row = {
                "model": model,
                "linear": name,
                "N": n,
                "K": k,
                "M": m,
                **checked,
                "matches_default_m1": matches_default_m1,
                "config": config,
                "bytes_moved": bytes_moved(m, n, k),
                "weight_copies": len(weights),
                "skinny_graph_us": skinny_us,
                "cublas_graph_us": cublas_us,
                "floor_us": floor_us,
                "skinny_GBps": bytes_moved(m, n, k) / skinny_us / 1e3,
                "skinny_share_of_copy": floor_us / skinny_us,
                "cublas_share_of_copy": floor_us / cublas_us,
                "speedup_over_cublas": cublas_us / skinny_us,
            }
            if m == 1:
                row["skinny_eager_us"] = eager_us(lambda w, x=x: skinny_matmul(x, w), weights[0])
                row["cublas_eager_us"] = eager_us(lambda w, x=x: F.linear(x, w), weights[0])
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    return rows


def sweep_configs(m: int, n: int, k: int):
    tiles = SWEEP_TILES + (SWEEP_ELEMENTWISE_TILES if m <= 2 else [])
    for block_n, block_k, num_warps, num_stages, use_dot in tiles:
        if block_k > triton.next_power_of_2(k):
            continue
        x_rows = 16 if use_dot else triton.next_power_of_2(m)
        if num_stages * (block_n + x_rows) * block_k * 2 > SHARED_MEMORY_LIMIT:
            continue
        yield {
            "block_n": block_n,
            "block_k": block_k,
            "split_k": default_split_k(n, k, block_n, block_k),
            "num_warps": num_warps,
            "num_stages": num_stages,
            "use_dot": use_dot,
            "fused_reduce": True,
        }


@dataclasses.dataclass
class SweepCase:
    """One shape at one M, and the sweep rows timed for it so far (by config label)."""

    model: str
    linear: str
    n: int
    k: int
    m: int
    x: torch.Tensor
    weights: list[torch.Tensor]
    floor_us: float
    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    default_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.default_out = skinny_matmul(self.x, self.weights[0])

    def measure(self, config: dict, rep_ms: int) -> None:
        label = config_label(config)
        if label in self.results:
            return
        row = {"model": self.model, "linear": self.linear, "N": self.n, "K": self.k}
        row |= {"M": self.m, "config": config, "label": label}
        x = self.x
        try:
            row |= check(x, self.weights[0], config)
            # Which configs round like choose_config's (see the module docstring).
            out = skinny_matmul(x, self.weights[0], **config)
            row["same_bits_as_default"] = bool(torch.equal(out, self.default_out))
            us = graph_us(lambda w: skinny_matmul(x, w, **config), self.weights, rep_ms)
            row |= {"skinny_graph_us": us, "skinny_share_of_copy": self.floor_us / us}
        except Exception as error:  # out of shared memory, compile errors
            row |= {"ok": False, "error": repr(error)[:300]}
        self.results[label] = row
        print_sweep_row(row)

    def fastest(self) -> dict | None:
        timed = [r for r in self.results.values() if r["ok"] and "skinny_graph_us" in r]
        return min(timed, key=lambda r: r["skinny_graph_us"]) if timed else None


def sweep(shapes, bandwidth: float, rep_ms: int, budget_s: float, weights_for):
    """Tiles at default_split_k, then splits (and the separate reduce kernel) on the best
    tile; returns (rows, best per shape and M, whether the budget cut any case short)."""
    end = time.monotonic() + budget_s
    rows, best = [], []
    truncated = False
    cases_left = len(shapes) * len(SWEEP_ROWS)
    for model, name, n, k in shapes:
        weights = weights_for(n, k)
        for m in SWEEP_ROWS:
            # An equal share of what is left, so a slow shape cannot starve the later ones;
            # at least 15 s, as the first case also compiles every tile's kernel.
            now = time.monotonic()
            deadline = min(end, now + max(15.0, (end - now) / cases_left))
            cases_left -= 1
            x = torch.randn(m, k, device="cuda").to(DTYPE)
            floor_us = bytes_moved(m, n, k) / bandwidth * 1e6
            case = SweepCase(model, name, n, k, m, x, weights, floor_us)
            for config in sweep_configs(m, n, k):
                if time.monotonic() > deadline:
                    truncated = True
                    break
                case.measure(config, rep_ms)
            top = case.fastest()
            if top is not None and time.monotonic() <= deadline:
                tile = top["config"]
                k_tiles = triton.cdiv(k, tile["block_k"])
                for split_k in SWEEP_SPLITS:
                    if split_k == 1 or 2 * split_k <= k_tiles:
                        case.measure({**tile, "split_k": split_k}, rep_ms)
                top = case.fastest()
                if top is not None and top["config"]["split_k"] > 1:
                    case.measure({**top["config"], "fused_reduce": False}, rep_ms)
                top = case.fastest()
            rows.extend(case.results.values())
            if top is not None:
                best.append(
                    {
                        "model": model,
                        "linear": name,
                        "N": n,
                        "K": k,
                        "M": m,
                        "config": top["config"],
                        "label": top["label"],
                        "skinny_graph_us": top["skinny_graph_us"],
                        "skinny_share_of_copy": top["skinny_share_of_copy"],
                        "floor_us": floor_us,
                        "configs_tried": len(case.results),
                    }
                )
    return rows, best, truncated


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--rows", default="1,2,4,8,16", help="comma-separated M values")
    parser.add_argument(
        "--shapes", default="", help="comma-separated model:linear filters (default: all)"
    )
    parser.add_argument("--sweep", action="store_true", help="also time a grid of configs")
    parser.add_argument("--sweep-budget-s", type=float, default=150.0)
    parser.add_argument("--rep-ms", type=int, default=20, help="do_bench_cudagraph rep")
    parser.add_argument(
        "--quant", default="", help="time the quantized linears instead: fp8,int8,int4"
    )
    parser.add_argument(
        "--sweep-tiled", action="store_true", help="--quant --sweep: int4 prefill tiles too"
    )
    parser.add_argument(
        "--tuned-out", default="", help="--quant --sweep: JSON of the configs that beat the rules"
    )
    parser.add_argument(
        "--quant-rows", default="1,2,4,8,16,64,512,2048", help="M values of --quant"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quant:
        from benchmarks.kernels_quant import quant_main

        sys.exit(quant_main(args))
    started = time.monotonic()
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    wanted = {s for s in args.shapes.split(",") if s}
    shapes = [
        (model, name, n, k)
        for model, linears in SHAPES.items()
        for name, (n, k) in linears.items()
        if not wanted or f"{model}:{name}" in wanted
    ]
    cache: dict[tuple[int, int], list[torch.Tensor]] = {}

    def weights_for(n: int, k: int) -> list[torch.Tensor]:
        if (n, k) not in cache:
            cache.clear()  # one shape's copies at a time (lm_head is 1 GB)
            torch.cuda.empty_cache()
            cache[(n, k)] = weight_copies(n, k)
        return cache[(n, k)]

    rows_list = [int(m) for m in args.rows.split(",")]
    rows = main_rows(shapes, rows_list, bandwidth, args.rep_ms, weights_for)
    sweep_rows, best, truncated = [], [], False
    if args.sweep:
        print("\nsweep (graph replay, HBM-resident weights):", flush=True)
        sweep_rows, best, truncated = sweep(
            shapes, bandwidth, max(5, args.rep_ms // 2), args.sweep_budget_s, weights_for
        )
        print_best(best, rows)
        if truncated:
            print(f"some sweep cases were cut short by the {args.sweep_budget_s:.0f} s budget")

    result = {
        "workload": "kernels-linear",
        "models": list(SHAPES),
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/kernels_linear.py " + " ".join(sys.argv[1:]),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "num_sms_planned": NUM_SMS,
        "num_sms_card": torch.cuda.get_device_properties(0).multi_processor_count,
        "timing": (
            "medians of triton.testing.do_bench_cudagraph over a graph that cycles through"
            f" weight copies ({ROTATE_BYTES >> 20} MiB in all) so each call reads its weight"
            " from HBM; per-call µs = graph time / copies. floor = (weight + x + out bytes) /"
            " copy bandwidth. *_eager_us (M = 1 rows): wall time per call launched back to"
            " back from Python. Sweep rows use rep = half of --rep-ms."
        ),
        "rows": rows,
        "sweep": sweep_rows,
        "sweep_best": best,
        "sweep_truncated": truncated,
        "wall_s": time.monotonic() - started,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-kernels-linear.json")
    failed = [f"{r['model']}:{r['linear']} M={r['M']}" for r in rows if not r["ok"]]
    sweep_failed = [f"{r['linear']} M={r['M']} {r['label']}" for r in sweep_rows if not r["ok"]]
    print(f"card: {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"wall {result['wall_s']:.0f} s")
    if sweep_failed:
        print(f"sweep configs that failed (not counted as failures): {sweep_failed}")
    print("all checks passed" if not failed else f"FAILED: {failed}")
    sys.exit(1 if failed else 0)


def print_row(row: dict, header: bool) -> None:
    columns = (
        ("model", 11, "{}"),
        ("linear", 8, "{}"),
        ("N", 7, "{}"),
        ("K", 6, "{}"),
        ("M", 3, "{}"),
        ("ok", 6, "{}"),
        ("relative_error", 9, "{:.1e}"),
        ("batch_invariant", 6, "{}"),
        ("skinny_graph_us", 9, "{:.2f}"),
        ("cublas_graph_us", 9, "{:.2f}"),
        ("floor_us", 9, "{:.2f}"),
        ("skinny_GBps", 7, "{:.0f}"),
        ("skinny_share_of_copy", 7, "{:.2f}"),
        ("cublas_share_of_copy", 7, "{:.2f}"),
    )
    if header:
        names = {"relative_error": "rel_err", "batch_invariant": "inv"}
        names |= {"skinny_graph_us": "skinny", "cublas_graph_us": "cublas"}
        names |= {"skinny_GBps": "GB/s", "skinny_share_of_copy": "share"}
        names |= {"cublas_share_of_copy": "cub_sh"}
        print("".join(f"{names.get(name, name):>{width}}" for name, width, _ in columns))
    cells = []
    for name, width, fmt in columns:
        value = row[name]
        cells.append(f"{'-' if value is None else fmt.format(value):>{width}}")
    print("".join(cells) + f"  {config_label(row['config'])}", flush=True)


def print_sweep_row(row: dict) -> None:
    if "skinny_graph_us" in row:
        timing = f"{row['skinny_graph_us']:8.2f} us  share {row['skinny_share_of_copy']:.2f}"
    else:
        timing = f"error {row.get('error', '')[:80]}"
    flags = "" if row.get("same_bits_as_default", True) else "  (other bits than default)"
    flags += "" if row["ok"] else "  CHECK FAILED"
    print(
        f"  {row['model']:>11} {row['linear']:>8} M={row['M']:<2} {row['label']:<34} {timing}"
        f"{flags}",
        flush=True,
    )


def print_best(best: list[dict], rows: list[dict]) -> None:
    default = {(r["model"], r["linear"], r["M"]): r for r in rows}
    print("\nbest per shape (sweep) against the default config and cuBLAS:")
    for b in best:
        base = default.get((b["model"], b["linear"], b["M"]))
        against = ""
        if base:
            against = (
                f"  default {base['skinny_graph_us']:.2f} us, cuBLAS {base['cublas_graph_us']:.2f}"
            )
        print(
            f"  {b['model']:>11} {b['linear']:>8} M={b['M']:<2} {b['label']:<34}"
            f" {b['skinny_graph_us']:7.2f} us (share {b['skinny_share_of_copy']:.2f}){against}",
            flush=True,
        )
    print("as a table for choose_config, (M, N, K): config fields:")
    for b in best:
        c = b["config"]
        print(
            f"    ({b['M']}, {b['N']}, {b['K']}): ({c['block_n']}, {c['block_k']},"
            f" {c['split_k']}, {c['num_warps']}, {c['num_stages']}, {c['use_dot']},"
            f" {c['fused_reduce']}),"
        )


if __name__ == "__main__":
    main()
