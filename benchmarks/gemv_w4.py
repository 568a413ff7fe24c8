"""The int4 GEMV (kernels/int4_gemv.py) against skinny_matmul's int4 tile path on the GPU,
at llama3-8b's decode linears (W1's shapes: qkv, o, gate_up, down), a small sweep of the
GEMV's launch parameters, and the table of which kernel (and GEMV config) won, for
engine_workloads.py --skinny-configs, in one command (~50 s on an H200).

1. One row (what W1 runs), per shape: skinny_matmul_w4 with gemv=False (the tile path at
   the committed tuned table: what ran before), the GEMV at its rule (skinny_matmul.
   _gemv_rule) and at each candidate of GEMV_SWEEP (rows a program, warps, words straight
   into registers / staged by cp.async / prefetched a step ahead, split-K). Each call is
   checked against the pure-torch reference (relative error) and timed by graph replay
   over weight copies that defeat L2 (kernels_quant.time_path: every call reads HBM, as a
   decode step does): µs, GB/s and share of the copy bandwidth measured in the same call.
   int4 group 128 symmetric (what W8-decode's gptq runs).
2. 2, 4, 8 and 16 rows, per shape: the tile path against the GEMV at its rule (for the
   record: 2-16 rows keep the tile path unless a table says otherwise).
3. fp8 W8A8, one row, per shape: the committed config against the same with the L2
   prefetch of each program's first weight tiles before its PDL wait and the rows' absmax
   pass (SkinnyConfig.prefetch); an fp8 entry where that is 2 % faster.
4. --tuned-out FILE: one int4-gemv entry per shape for one row, the fastest GEMV config
   where it beat the tile path, else gemv false (the tile path stays), and 3.'s: the list of
   entries kernels_quant.install_tuned reads (engine_workloads.py --skinny-configs FILE),
   and what lanner/kernels/tuned/h200_quant.json would take. Every timing goes to
   <stamp>-gemv-w4.json (save_copies: also $OUT).

    PYTHONPATH=. python3 benchmarks/gemv_w4.py --commit X [--tuned-out FILE] [--rep-ms 3]
        [--budget-s 60]

Every variant compiles first, on a thread pool (kernels/parallel_compile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
BATCH_ROWS = (2, 4, 8, 16)
# (block_n, num_warps, (num_stages, prefetch)), each step one 16-byte load a thread
# (block_k = 1024 x num_warps codes), each with split-K: words straight into registers,
# staged through shared memory (cp.async, 2 stages), or prefetched a step ahead into
# registers. W1's shapes compile about 30 binaries.
_TILES = [
    (bn, warps, staging)
    for bn in (8, 16)
    for warps in (1, 2, 4)
    for staging in ((1, False), (2, False), (1, True))
]
SPLITS = (1, 2, 4)
# fp8's L2 prefetch goes into the table only when this much faster (timing noise).
FP8_PREFETCH_MIN_GAIN = 1.02
GEMV_FIELDS = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "prefetch")


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


def compile_everything(shapes) -> None:
    """Every variant the run launches, compiled on a thread pool (results unused)."""
    with compile_launches():
        for _, n, k in shapes:
            w = QuantWeights("int4", n, k)
            for m in (1, *BATCH_ROWS):
                x = torch.randn(m, k, device=DEVICE).to(DTYPE)
                for config in ({"gemv": False}, {"gemv": True}):
                    w.skinny(x, w.tensors, **config)
            x = torch.randn(1, k, device=DEVICE).to(DTYPE)
            for config in gemv_sweep(k):
                w.skinny(x, w.tensors, **config)
            del w
            w = QuantWeights("fp8", n, k)
            for config in ({}, {"prefetch": True}):
                w.skinny(x, w.tensors, **config)
            del w
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--rep-ms", type=int, default=3)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="seconds from the start after which the sweep's remaining candidates are skipped",
    )
    parser.add_argument(
        "--tuned-out",
        default="",
        help="JSON list of int4-gemv entries (engine_workloads.py --skinny-configs)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    bandwidth = copy_rate()
    print(f"card {card}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    shapes = [(name, *SHAPES["llama3-8b"][name]) for name in ORDER]
    before = time.monotonic()
    compile_everything(shapes)
    compile_s = time.monotonic() - before
    print(f"compiled in {compile_s:.0f} s", flush=True)

    one_row, batches, entries = [], [], []
    for name, n, k in shapes:
        w = QuantWeights("int4", n, k)
        x = torch.randn(1, k, device=DEVICE).to(DTYPE)
        reference = w.reference(x)
        print(f"\nint4 g128 {name} {n}x{k}, one row: µs, GB/s, share of copy", flush=True)
        timed = []
        for path, config in (
            ("old", {"gemv": False}),
            ("rule", {"gemv": True}),
            *(("sweep", c) for c in gemv_sweep(k)),
        ):
            if path == "sweep" and time.monotonic() - started > args.budget_s:
                print("  (sweep budget spent: the rest skipped)", flush=True)
                break
            row = annotate(run_one(w, x, reference, args.rep_ms, config), w, 1, bandwidth)
            timed.append(
                {"linear": name, "N": n, "K": k, "M": 1, "path": path, "config": config, **row}
            )
            print(f"  {path:<5} {label(config):<72} {shown(row)}", flush=True)
        one_row += timed
        old = timed[0]
        gemvs = sorted((t for t in timed[1:] if t["ok"]), key=lambda t: t["us"])
        best = gemvs[0] if gemvs else None
        wins = best is not None and (not old["ok"] or best["us"] < old["us"])
        if best is not None:
            if best["path"] == "rule":  # the config choose_int4_config picked
                chosen = skinny.choose_int4_config(1, n, k, 128, True)[1]
                config = {field: getattr(chosen, field) for field in GEMV_FIELDS}
            else:
                config = {key: v for key, v in best["config"].items() if key != "gemv"}
            entries.append(
                {
                    "format": skinny.INT4_GEMV,
                    "rows": 1,
                    "N": n,
                    "K": k,
                    "config": {**config, "use_dot": False, "fused_reduce": True, "gemv": wins},
                    "gemv_us": round(best["us"], 2),
                    "tile_us": round(old["us"], 2) if old["ok"] else None,
                    "share_of_copy": round(best["share_of_copy"], 3),
                }
            )
            verdict = "GEMV" if wins else "tile path"
            print(
                f"  -> {verdict}: GEMV best {best['us']:.2f} us "
                f"({best['share_of_copy']:.2f} of copy) {label(best['config'])}; "
                f"tile path {shown(old)}",
                flush=True,
            )
        for m in BATCH_ROWS:
            xm = torch.randn(m, k, device=DEVICE).to(DTYPE)
            reference_m = w.reference(xm)
            rows = {
                path: annotate(run_one(w, xm, reference_m, args.rep_ms, config), w, m, bandwidth)
                for path, config in (("old", {"gemv": False}), ("rule", {"gemv": True}))
            }
            batches.append({"linear": name, "N": n, "K": k, "M": m, **rows})
            print(
                f"  M={m:<2} old {shown(rows['old'])}   GEMV rule {shown(rows['rule'])}", flush=True
            )
        del w
        torch.cuda.empty_cache()

    # fp8 W8A8, one row: the committed config, and the same asking L2 for each program's
    # first weight tiles before its PDL wait and the rows' absmax pass (SkinnyConfig.
    # prefetch): the absmax pass delays a short launch's first weight loads.
    print("\nfp8 W8A8 one row: committed config vs the same with the L2 prefetch", flush=True)
    fp8_rows = []
    for name, n, k in shapes:
        w = QuantWeights("fp8", n, k)
        x = torch.randn(1, k, device=DEVICE).to(DTYPE)
        reference = w.reference(x)
        rows = {
            path: annotate(run_one(w, x, reference, args.rep_ms, config), w, 1, bandwidth)
            for path, config in (("old", {}), ("prefetch", {"prefetch": True}))
        }
        fp8_rows.append({"linear": name, "N": n, "K": k, "M": 1, **rows})
        faster = rows["prefetch"]["ok"] and rows["old"]["ok"]
        faster = faster and rows["prefetch"]["us"] * FP8_PREFETCH_MIN_GAIN < rows["old"]["us"]
        if faster:
            committed = dataclasses.asdict(skinny.choose_config(1, n, k, skinny.FP8))
            entries.append(
                {
                    "format": skinny.FP8,
                    "rows": 1,
                    "N": n,
                    "K": k,
                    "config": {**committed, "prefetch": True},
                    "us": round(rows["prefetch"]["us"], 2),
                    "without_prefetch_us": round(rows["old"]["us"], 2),
                }
            )
        print(
            f"  {name:<8} old {shown(rows['old'])}   prefetch {shown(rows['prefetch'])}"
            + ("  -> prefetch" if faster else ""),
            flush=True,
        )
        del w
        torch.cuda.empty_cache()

    print("\none row, a W1 token's 32 layers of the four linears:")
    for path in ("old", "rule"):
        rows = [t for t in one_row if t["path"] == path and t["ok"]]
        print(
            f"  {path:<5}: {sum(32 * t['us'] for t in rows) / 1e3:.3f} ms over {len(rows)} shapes"
        )
    chosen_us = sum(
        32 * (e["gemv_us"] if e["config"]["gemv"] else e["tile_us"])
        for e in entries
        if e["format"] == skinny.INT4_GEMV
    )
    print(f"  table: {chosen_us / 1e3:.3f} ms (the faster kernel per shape)")
    for entry in entries:
        print(f"  entry {json.dumps(entry)}")
    result = {
        "workload": "gemv-w4",
        "card": card,
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/gemv_w4.py " + " ".join(sys.argv[1:]),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "one_row": one_row,
        "batches": batches,
        "fp8_one_row": fp8_rows,
        "tuned_entries": entries,
        "compile_s": compile_s,
        "wall_s": time.monotonic() - started,
    }
    configs = skinny.tuned_entries_to_configs(entries)  # loadable as written
    if args.tuned_out:
        path = Path(args.tuned_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"{len(configs)} entries -> {path}")
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-gemv-w4.json")
    print(f"wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
