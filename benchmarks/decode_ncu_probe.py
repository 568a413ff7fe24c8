"""Decode attention at W4-like shapes (256 sequences x 1,500 tokens, llama3-8b heads):
one call per cache dtype for Nsight Compute to profile, or with --time its time per
register cap (Triton's maxnreg) and tile setting, for bf16 and fp8 caches.

    ncu --clock-control none -k regex:_decode_partial --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 benchmarks/decode_ncu_probe.py [--dtypes bf16,fp8]
    python3 benchmarks/decode_ncu_probe.py --time
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton

from benchmarks.kernels_attention import HEAD_DIM, paged_case
from lanner.kernels.paged_attention import decode_attention, paged_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="bf16,fp8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--time", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    query, kv_cache, metadata = paged_case([1] * args.batch, [args.context] * args.batch)
    if args.time:
        time_register_caps(query, kv_cache, metadata, args.dtypes.split(","))
        return
    for name in args.dtypes.split(","):
        cache = kv_cache.to(torch.float8_e4m3fn) if name == "fp8" else kv_cache
        for _ in range(4):  # compile, then the launches ncu picks from
            paged_attention(query, cache, metadata, HEAD_DIM**-0.5)
        torch.cuda.synchronize()


def time_register_caps(query, kv_cache, metadata, dtypes: list[str]) -> None:  # noqa: ANN001
    out = torch.empty_like(query)
    for name in dtypes:
        cache = kv_cache.to(torch.float8_e4m3fn) if name == "fp8" else kv_cache
        for block_n, warps, stages in [(64, 2, 3), (64, 4, 3), (128, 4, 3), (64, 2, 2)]:
            cells = []
            for cap in (None, 168, 128, 96):
                run = functools.partial(
                    decode_attention,
                    query,
                    cache,
                    metadata,
                    HEAD_DIM**-0.5,
                    None,
                    out,
                    block_n=block_n,
                    num_warps=warps,
                    num_stages=stages,
                    max_registers=cap,
                )
                try:
                    ms = triton.testing.do_bench(run, warmup=10, rep=60)
                    cells.append(f"cap {cap}: {ms:.4f} ms")
                except Exception as err:  # noqa: BLE001
                    cells.append(f"cap {cap}: failed {str(err)[:80]}")
            print(f"{name} N{block_n} w{warps} s{stages}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
