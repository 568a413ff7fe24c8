"""The int4 GEMV (kernels/int4_gemv.py) against skinny_matmul's int4 tile path on the GPU,
at llama3-8b's decode linears (W1's shapes: qkv, o, gate_up, down), and a sweep of the
GEMV's launch parameters, in one command.

1. Old vs new: per shape and M in 1, 2, 4, 8, 16, skinny_matmul_w4 with gemv=False (the
   tile path with the committed tuned table: what ran before) and gemv=True (the GEMV at
   its rule, lanner/kernels/skinny_matmul.py _gemv_rule), each checked against the
   pure-torch reference (relative error) and timed by graph replay over weight copies
   that defeat L2 (kernels_quant.time_path: every call reads HBM, as a decode step does);
   µs, GB/s and share of the copy bandwidth measured in the same call. int4 group 128
   symmetric (what W8-decode's gptq runs), and at M = 1 also with zero points.
2. Sweep: the GEMV's candidates (GEMV_SWEEP: rows a program, warps, codes a step, cp.async
   stages, split-K) per shape at M = 1, and the best few of them at M = 2 and 4, within
   --budget-s; prints the best per shape and key and writes them as tuned-table entries
   (format "int4-gemv", the layout of lanner/kernels/tuned/h200_quant.json) to
   $OUT/gemv_w4_tuned.json; every timing goes to <stamp>-gemv-w4.json (save_copies).

    PYTHONPATH=. python3 benchmarks/gemv_w4.py --commit X [--budget-s 100] [--rep-ms 5]

Every candidate compiles first, on a thread pool (kernels/parallel_compile.py), outside
the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.kernels_linear import RESULTS, SHAPES, relative_error
from benchmarks.kernels_quant import MAX_RELATIVE_ERROR, QuantWeights, moved_bytes, time_path
from lanner.bench.report import save_copies
from lanner.bench.roofline import copy_rate
from lanner.kernels import skinny_matmul as skinny
from lanner.kernels.parallel_compile import compile_launches

DEVICE = "cuda"
DTYPE = torch.bfloat16
ORDER = ("gate_up", "down", "qkv", "o")
ROWS = (1, 2, 4, 8, 16)
SWEEP_ROWS = (2, 4)  # the best M = 1 candidates are timed again at these
SWEEP_TOP = 4
# (block_n, num_warps, (num_stages, prefetch)), each step one 16-byte load a thread
# (block_k = 1024 x num_warps codes), each with split-K: words straight into registers,
# staged through shared memory (cp.async, 2 stages), or prefetched a step ahead into
# registers. W1's shapes compile about 45 binaries at one row.
_TILES = [
    (bn, warps, staging)
    for bn in (4, 8, 16)
    for warps in (1, 2, 4)
    for staging in ((1, False), (2, False), (1, True))
]
SPLITS = (1, 2, 4)


def gemv_sweep(k: int) -> list[dict]:
    """The GEMV candidates for a K: steps that divide the row (no masked last step),
    splits of at least one step each."""
    row_ints = -(-k // 512) * 64
    configs = []
    for bn, warps, (stages, prefetch) in _TILES:
        block_k = 1024 * warps
        if row_ints % (block_k // 8):
            continue
        for split_k in SPLITS:
            if split_k * block_k // 8 > row_ints:
                continue
            configs.append(
                dict(
                    gemv=True,
                    block_n=bn,
                    block_k=block_k,
                    num_warps=warps,
                    num_stages=stages,
                    split_k=split_k,
                    prefetch=prefetch,
                )
            )
    return configs


def label(config: dict | None) -> str:
    if config is None:
        return "rule"
    shown = {key: value for key, value in config.items() if key != "gemv"}
    return " ".join(f"{key}={value}" for key, value in shown.items())


def run_one(w: QuantWeights, x: torch.Tensor, reference, rep_ms: int, config: dict) -> dict:
    """Checks and times one call; {"ok": False, "error"} where it fails."""
    try:
        out = w.skinny(x, w.tensors, **config)
        error = relative_error(out, reference)
        if error > MAX_RELATIVE_ERROR:
            raise AssertionError(f"relative error {error:.2e}")
        us = time_path(w.skinny, w, x, rep_ms, **config)
    except Exception as failure:  # out of resources, failed checks
        return {"ok": False, "error": repr(failure)[:200]}
    return {"ok": True, "us": us, "relative_error": error}


def annotate(row: dict, w: QuantWeights, m: int, bandwidth: float) -> dict:
    if row["ok"]:
        moved = moved_bytes(w, m)
        row["GBps"] = moved / (row["us"] * 1e-6) / 1e9
        row["share_of_copy"] = moved / bandwidth / (row["us"] * 1e-6)
    return row


def shown(row: dict) -> str:
    if not row["ok"]:
        return f"failed: {row['error'][:60]}"
    return f"{row['us']:7.2f} us {row['GBps']:6.0f} GB/s ({row['share_of_copy']:.2f})"


def compile_everything(shapes, methods) -> None:
    """Every variant the run launches, compiled on a thread pool (results unused)."""
    with compile_launches():
        for method in methods:
            for _, n, k in shapes:
                w = QuantWeights(method, n, k)
                for m in ROWS if method == "int4" else (1,):
                    x = torch.randn(m, k, device=DEVICE).to(DTYPE)
                    for config in ({"gemv": False}, {"gemv": True}):
                        w.skinny(x, w.tensors, **config)
                    if m in (1, *SWEEP_ROWS) and method == "int4":
                        for config in gemv_sweep(k):
                            w.skinny(x, w.tensors, **config)
                del w
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--budget-s", type=float, default=100.0, help="seconds of sweep timing")
    parser.add_argument("--rep-ms", type=int, default=5)
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    print(f"card {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    shapes = [(name, *SHAPES["llama3-8b"][name]) for name in ORDER]
    before = time.monotonic()
    compile_everything(shapes, ("int4", "int4-g128z"))
    compile_s = time.monotonic() - before
    print(f"compiled in {compile_s:.0f} s", flush=True)

    compared, swept, entries = [], [], []
    print("\nold (tile path, tuned table) vs new (GEMV, rule): µs, GB/s, share of copy")
    for name, n, k in shapes:
        for method in ("int4", "int4-g128z"):
            w = QuantWeights(method, n, k)
            for m in ROWS if method == "int4" else (1,):
                x = torch.randn(m, k, device=DEVICE).to(DTYPE)
                reference = w.reference(x)
                rows = {}
                for path, config in (("old", {"gemv": False}), ("new", {"gemv": True})):
                    rows[path] = annotate(
                        run_one(w, x, reference, args.rep_ms, config), w, m, bandwidth
                    )
                speedup = (
                    rows["old"]["us"] / rows["new"]["us"]
                    if rows["old"]["ok"] and rows["new"]["ok"]
                    else None
                )
                compared.append(
                    {
                        "linear": name,
                        "method": method,
                        "N": n,
                        "K": k,
                        "M": m,
                        **rows,
                        "speedup": speedup,
                    }
                )
                tail = f"x{speedup:.2f}" if speedup else ""
                print(
                    f"  {method:>10} {name:<8} M={m:<2} old {shown(rows['old'])}  "
                    f"new {shown(rows['new'])}  {tail}",
                    flush=True,
                )
            del w
            torch.cuda.empty_cache()

    deadline = time.monotonic() + args.budget_s
    print("\nsweep of the GEMV (int4 group 128, symmetric):")
    for index, (name, n, k) in enumerate(shapes):
        w = QuantWeights("int4", n, k)
        xs = {m: torch.randn(m, k, device=DEVICE).to(DTYPE) for m in (1, *SWEEP_ROWS)}
        references = {m: w.reference(x) for m, x in xs.items()}
        # An equal share of what is left to each shape still to come.
        shape_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(shapes) - index)
        timed = []
        for config in gemv_sweep(k):
            if time.monotonic() > shape_deadline:
                break
            row = annotate(run_one(w, xs[1], references[1], args.rep_ms, config), w, 1, bandwidth)
            timed.append({"linear": name, "N": n, "K": k, "M": 1, "config": config, **row})
            print(f"  {name:<8} M=1 {label(config):<70} {shown(row)}", flush=True)
        ranked = sorted((t for t in timed if t["ok"]), key=lambda t: t["us"])
        for m in SWEEP_ROWS:
            for top in ranked[:SWEEP_TOP]:
                config = top["config"]
                row = annotate(
                    run_one(w, xs[m], references[m], args.rep_ms, config), w, m, bandwidth
                )
                timed.append({"linear": name, "N": n, "K": k, "M": m, "config": config, **row})
                print(f"  {name:<8} M={m} {label(config):<70} {shown(row)}", flush=True)
        swept += timed
        if ranked:
            best = ranked[0]
            config = {key: v for key, v in best["config"].items() if key != "gemv"}
            entries.append(
                {
                    "format": skinny.INT4_GEMV,
                    "rows": 1,
                    "N": n,
                    "K": k,
                    "config": {**config, "use_dot": False, "fused_reduce": True},
                    "us": round(best["us"], 2),
                    "GBps": round(best["GBps"]),
                    "share_of_copy": round(best["share_of_copy"], 3),
                }
            )
        del w, xs, references
        torch.cuda.empty_cache()

    print("\nbest GEMV per shape at M = 1 (tuned-table entries):")
    for entry in entries:
        print(f"  {entry['N']}x{entry['K']}: {json.dumps(entry)}")
    print("\nold vs new at the rule, summed over a W1 token's 32 layers (M = 1):")
    for path in ("old", "new"):
        rows = [c for c in compared if c["method"] == "int4" and c["M"] == 1 and c[path]["ok"]]
        total = sum(32 * c[path]["us"] for c in rows)
        print(f"  {path}: {total / 1e3:.3f} ms a token over {len(rows)} shapes")
    result = {
        "workload": "gemv-w4",
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/gemv_w4.py " + " ".join(sys.argv[1:]),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "compared": compared,
        "swept": swept,
        "tuned_entries": entries,
        "compile_s": compile_s,
        "wall_s": time.monotonic() - started,
    }
    skinny.tuned_entries_to_configs(entries)  # loadable as written
    out_dir = Path(os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gemv_w4_tuned.json").write_text(json.dumps(entries, indent=1) + "\n")
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-gemv-w4.json")
    print(f"wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
