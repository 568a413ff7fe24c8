"""Tunes the quantized skinny kernels (skinny_matmul_w8 W8A8 fp8, skinny_matmul_w4 int4)
on the GPU at hand and writes the measured best configs as the committed table that
skinny_matmul reads by default on that card (lanner/kernels/tuned/*.json).

Per weight format and decode linear shape (llama3-8b's qkv, o, gate_up, down; with
--small also qwen3-0.6b's), two keys as choose_config has them: rows 1 (a single row, its
own binary) and rows 2-16 (one dot-path config for every M in 2..16, which keeps them
batch invariant), timed at M = 2, 4, 8, 16 and ranked by their summed time. Each
candidate of a small grid is checked against the pure-torch reference (relative error)
and, for 2-16, for bitwise batch invariance (a row of the 16-row call against a 2-row
call); then the best two tiles again at each split-K. Timing: graph replay over weight
copies that defeat L2 (benchmarks/kernels_quant.py's time_path), so every call reads HBM
as a decode step does. A config replaces the rule only when it is TUNED_MIN_GAIN faster.

    PYTHONPATH=. python3 benchmarks/tune_quant.py --commit X [--formats fp8,int4]
        [--budget-s 200] [--small]

Prints one line per candidate and a table of best vs rule per key (µs, GB/s, share of the
copy bandwidth); writes $OUT/<card>_quant.json (the table to commit as
lanner/kernels/tuned/h200_quant.json) and benchmarks/results/<stamp>-tune-quant.json
(every timing) through save_copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import triton

from benchmarks.kernels_linear import RESULTS, SHAPES, relative_error
from benchmarks.kernels_quant import (
    MAX_RELATIVE_ERROR,
    QuantWeights,
    moved_bytes,
    time_path,
    weights_format,
)
from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import skinny_matmul as skinny

DEVICE = "cuda"
DTYPE = torch.bfloat16
TUNED_MIN_GAIN = 1.02
ROW_CLASS_M = (2, 4, 8, 16)  # timed for the rows-16 key (every M in 2..16)
SCREEN_M = 8  # the rows-16 key's candidates are screened at this M first
SPLITS = (1, 2, 4, 8)
SHARED_LIMIT = 227 << 10
# (block_n, block_k, num_warps, num_stages, use_dot). fp8 W8A8: one row takes the
# elementwise path by rule; the dot path for 2-16 rows (and tried at one row too).
FP8_ONE_ROW = [
    (8, 1024, 4, 4, False),
    (16, 512, 4, 4, False),
    (16, 1024, 4, 3, False),
    (8, 512, 4, 6, False),
    (32, 512, 8, 3, False),
    (16, 1024, 8, 4, False),
]
FP8_DOT = [
    (128, 256, 4, 3, True),
    (128, 128, 4, 4, True),
    (64, 256, 4, 4, True),
    (128, 512, 8, 3, True),
    (256, 128, 8, 3, True),
    (256, 256, 8, 3, True),
    (64, 512, 4, 3, True),
]
# int4 (plane layout): block_k codes a step, four planes of block_k / 4 words; more
# stages and wider N blocks put more bytes in flight per SM; 4 and 8 warps multiply on
# Hopper's wgmma, 2 warps on mma.sync (A and B from registers, no warpgroup waits).
INT4_DOT = [
    (64, 512, 4, 3, True),
    (64, 256, 4, 4, True),
    (64, 256, 4, 6, True),
    (128, 256, 4, 4, True),
    (128, 256, 8, 4, True),
    (256, 256, 8, 3, True),
    (32, 256, 2, 4, True),
    (32, 512, 2, 3, True),
    (16, 512, 2, 4, True),
]
ORDER = ("gate_up", "down", "qkv", "o")


def shared_bytes(fmt: str, block_n: int, block_k: int, stages: int, use_dot: bool) -> int:
    """About the shared memory a config's pipeline takes with bf16 rows (16 padded rows on
    the dot path): a filter against configs that cannot launch."""
    if fmt == skinny.INT4:
        per_stage = block_n * block_k // 2 + 32 * block_k
    else:
        per_stage = block_n * block_k + (32 * block_k if use_dot else 2 * block_k)
    return stages * per_stage


def grid_for(fmt: str, rows: int) -> list[dict]:
    """The candidate tiles; int4 each with its plane sums scaled (exact) and with the
    weights scaled in registers (scale_weights: one MMA chain a step); fp8 each of the
    key's own inner product also with prequantize (quantize_rows, then the kernel reads
    the codes)."""
    tiles = INT4_DOT if fmt == skinny.INT4 else (FP8_ONE_ROW + FP8_DOT if rows == 1 else FP8_DOT)
    configs = [
        dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st, use_dot=dot)
        for bn, bk, w, st, dot in tiles
        if shared_bytes(fmt, bn, bk, st, dot) <= SHARED_LIMIT
    ]
    if fmt == skinny.INT4:
        configs = [{**c, "scale_weights": scaled} for scaled in (True, False) for c in configs]
    else:  # also with the rows quantized by a launch of their own (same bits)
        configs += [{**c, "prequantize": True} for c in configs if c["use_dot"] == (rows > 1)]
    return configs


@dataclasses.dataclass
class Case:
    """One (format, shape, rows key) and what was timed for it."""

    weights: QuantWeights
    linear: str
    rows: int  # 1 or 16 (standing for 2..16)
    bandwidth: float
    rep_ms: int
    xs: dict[int, torch.Tensor]
    references: dict[int, torch.Tensor]
    timed: list[dict] = dataclasses.field(default_factory=list)

    @property
    def ms(self) -> tuple[int, ...]:
        return (1,) if self.rows == 1 else ROW_CLASS_M

    def floor_us(self, ms: tuple[int, ...]) -> float:
        return sum(moved_bytes(self.weights, m) for m in ms) / self.bandwidth * 1e6

    def run(self, config: dict | None, ms: tuple[int, ...] | None = None) -> dict | None:
        """Checks and times one config (None: the rule's) at ms (default: every M of the
        key); None if it fails to run or was timed so already."""
        ms = ms or self.ms
        label = "rule" if config is None else json.dumps(config, sort_keys=True)
        if any(t["label"] == label and t["ms"] == list(ms) for t in self.timed):
            return None
        options = config or {}
        w = self.weights
        try:
            per_m = {}
            for m in ms:
                x = self.xs[m]
                out = w.skinny(x, w.tensors, **options)
                error = relative_error(out, self.references[m])
                if error > MAX_RELATIVE_ERROR:
                    raise AssertionError(f"relative error {error:.2e} at M={m}")
                if m > 2 and not torch.equal(out[1:2], w.skinny(x[:2], w.tensors, **options)[1:2]):
                    raise AssertionError(f"not batch invariant at M={m}")
                per_m[m] = time_path(w.skinny, w, x, self.rep_ms, **options)
        except Exception as error:  # out of resources, compile errors, failed checks
            print(f"    {label}: {repr(error)[:160]}", flush=True)
            failed = {"label": label, "config": config, "ms": list(ms), "ok": False}
            self.timed.append({**failed, "error": repr(error)[:300]})
            return None
        total = sum(per_m.values())
        row = {
            "label": label,
            "config": config,
            "ms": list(ms),
            "ok": True,
            "us_by_m": per_m,
            "us": total,
            "GBps": sum(moved_bytes(w, m) for m in ms) / (total * 1e-6) / 1e9,
            "share_of_copy": self.floor_us(ms) / total,
        }
        self.timed.append(row)
        print(
            f"    {label}: {total:8.2f} us ({row['share_of_copy']:.2f} of copy) "
            + " ".join(f"M{m}={us:.2f}" for m, us in per_m.items()),
            flush=True,
        )
        return row

    def ranked(self, ms: tuple[int, ...], tuned_only: bool = True) -> list[dict]:
        rows = [
            t
            for t in self.timed
            if t["ok"] and t["ms"] == list(ms) and (t["config"] is not None or not tuned_only)
        ]
        return sorted(rows, key=lambda t: t["us"])

    def best(self) -> dict | None:
        ranked = self.ranked(self.ms)
        return ranked[0] if ranked else None

    def rule(self) -> dict | None:
        return next((t for t in self.ranked(self.ms, False) if t["config"] is None), None)


def full_config(case: Case, config: dict) -> dict:
    """The config with split_k resolved as the launch resolves it (the table stores what
    ran) and fused_reduce on."""
    w = case.weights
    names = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "use_dot")
    plan = skinny._plan(
        case.ms[-1],
        w.n,
        w.k,
        weights_format(w),
        w.group,
        *(config.get(name) for name in names),
        None,
    )
    return {**config, "split_k": plan.grid[1], "fused_reduce": True}


def tune_case(case: Case, deadline: float) -> None:
    """The grid, then split-K on the best two tiles; for rows 2-16 these are screened at
    M = SCREEN_M and the best three (and the rule) timed at every M of the key."""
    fmt = weights_format(case.weights)
    screen = case.ms if case.rows == 1 else (SCREEN_M,)
    case.run(None, screen)
    for config in grid_for(fmt, case.rows):
        if time.monotonic() > deadline:
            break
        if config["block_k"] <= triton.next_power_of_2(case.weights.k):
            case.run(config, screen)
    for top in case.ranked(screen)[:2]:
        base = {key: v for key, v in top["config"].items() if key != "split_k"}
        for split_k in SPLITS:
            if time.monotonic() > deadline:
                break
            case.run({**base, "split_k": split_k}, screen)
    if screen != case.ms:
        case.run(None)
        for top in case.ranked(screen)[:3]:
            case.run(top["config"])


def compile_grid(method: str, n: int, k: int) -> None:
    """Compiles every candidate of a format (with and without split-K) once, outside the
    timing budget: every shape reuses the binaries (N and K are not specialized on
    beyond divisibility, which all of W1's shapes share)."""
    weights = QuantWeights(method, n, k)
    fmt = weights_format(weights)
    for rows, m in ((1, 1), (skinny.MAX_BLOCK_M, SCREEN_M)):
        x = torch.randn(m, k, device=DEVICE).to(DTYPE)
        for config in grid_for(fmt, rows):
            for split_k in (1, 2):
                try:
                    weights.skinny(x, weights.tensors, **{**config, "split_k": split_k})
                except Exception as error:  # reported again when the candidate is timed
                    print(f"    compile {config} split {split_k}: {repr(error)[:120]}")
    torch.cuda.synchronize()
    del weights
    torch.cuda.empty_cache()


def card_file_name(card: str) -> str:
    short = card.split()[-1] if card.startswith("NVIDIA ") else card
    return re.sub(r"[^a-z0-9]+", "_", short.lower()).strip("_") + "_quant.json"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--formats", default="fp8,int4", help="fp8 and/or int4 (group 128)")
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="seconds of timing, compiles apart"
    )
    parser.add_argument("--rep-ms", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="qwen3-0.6b's shapes too")
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    # Against the rules alone, whatever table is committed.
    skinny.use_shipped_configs(False)
    skinny.install_tuned_configs({})
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    print(f"card {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    models = ["llama3-8b"] + (["qwen3-0.6b"] if args.small else [])
    shapes = [(model, name, *SHAPES[model][name]) for model in models for name in ORDER]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    cases: list[tuple[str, Case]] = []
    for method in formats:
        if method not in ("fp8", "int4"):
            raise SystemExit(f"--formats: fp8 or int4, not {method!r}")
    before = time.monotonic()
    for method in formats:
        compile_grid(method, *shapes[0][2:])
    compile_s = time.monotonic() - before
    print(f"candidates compiled in {compile_s:.0f} s", flush=True)
    # The budget counts the timing only.
    deadline = time.monotonic() + args.budget_s
    total = len(formats) * len(shapes) * 2
    for method in formats:
        for model, name, n, k in shapes:
            weights = QuantWeights(method, n, k)
            xs = {
                m: torch.randn(m, k, device=DEVICE).to(DTYPE) for m in {1, SCREEN_M, *ROW_CLASS_M}
            }
            references = {m: weights.reference(x) for m, x in xs.items()}
            for rows in (1, skinny.MAX_BLOCK_M):
                # An equal share of what is left to each case still to come.
                now = time.monotonic()
                left = total - len(cases)
                case_deadline = min(deadline, now + max(8.0, (deadline - now) / max(left, 1)))
                case = Case(weights, name, rows, bandwidth, args.rep_ms, xs, references)
                print(f"{method} {model}:{name} {n}x{k} rows {rows if rows == 1 else '2-16'}")
                tune_case(case, case_deadline)
                cases.append((model, case))
            del weights, xs, references
            torch.cuda.empty_cache()

    entries, summary = [], []
    for model, case in cases:
        best, rule = case.best(), case.rule()
        w = case.weights
        item = {
            "model": model,
            "linear": case.linear,
            "format": weights_format(w),
            "rows": case.rows,
            "N": w.n,
            "K": w.k,
            "floor_us": case.floor_us(case.ms),
            "rule_us": rule["us"] if rule else None,
            "rule_share_of_copy": rule["share_of_copy"] if rule else None,
            "best": best,
            "configs_tried": len(case.timed),
        }
        summary.append(item)
        if best and (rule is None or rule["us"] > TUNED_MIN_GAIN * best["us"]):
            entries.append(
                {
                    "format": item["format"],
                    "rows": case.rows,
                    "N": w.n,
                    "K": w.k,
                    "config": full_config(case, best["config"]),
                    "us": best["us"],
                    "GBps": best["GBps"],
                    "share_of_copy": best["share_of_copy"],
                    "rule_us": item["rule_us"],
                }
            )
    print("\nbest per key (µs summed over the key's M values; share of copy bandwidth):")
    for item in summary:
        best = item["best"]
        rows = "1" if item["rows"] == 1 else "2-16"
        rule = (
            f"{item['rule_us']:.2f} ({item['rule_share_of_copy']:.2f})" if item["rule_us"] else "-"
        )
        shown = (
            f"{best['us']:.2f} us, {best['GBps']:.0f} GB/s ({best['share_of_copy']:.2f}) "
            f"{best['label']}"
            if best
            else "none ran"
        )
        name = f"{item['model']}:{item['linear']}"
        print(f"  {item['format']:>4} {name:<18} rows {rows:<4} rule {rule} -> {shown}")
    table = {
        card: {
            "commit": args.commit,
            "triton": triton.__version__,
            "torch": torch.__version__,
            "copy_bandwidth_GBps": bandwidth / 1e9,
            "command": "PYTHONPATH=. python3 benchmarks/tune_quant.py " + " ".join(sys.argv[1:]),
            "configs": entries,
        }
    }
    # Loadable as written (the same check skinny_matmul runs on the shipped files).
    skinny.tuned_entries_to_configs(entries)
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / card_file_name(card)
    table_path.write_text(json.dumps(table, indent=1) + "\n")
    result = {
        "workload": "tune-quant",
        "card": card,
        "commit": args.commit,
        "command": table[card]["command"],
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "summary": summary,
        "timed": [
            {
                "model": model,
                "linear": c.linear,
                "format": weights_format(c.weights),
                "rows": c.rows,
                **t,
            }
            for model, c in cases
            for t in c.timed
        ],
        "tuned_configs": entries,
        "compile_s": compile_s,
        "wall_s": time.monotonic() - started,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-tune-quant.json")
    print(f"{len(entries)} tuned configs -> {table_path}; wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
