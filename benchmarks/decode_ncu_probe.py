"""One decode-attention call per cache dtype at a W4-like shape (256 sequences x 1,500
tokens, llama3-8b heads), for Nsight Compute to profile:

    ncu --clock-control none -k regex:_decode_partial --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        python3 benchmarks/decode_ncu_probe.py [--dtypes bf16,fp8]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels_attention import HEAD_DIM, paged_case
from lanner.kernels.paged_attention import paged_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="bf16,fp8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500)
    args = parser.parse_args()
    torch.manual_seed(0)
    query, kv_cache, metadata = paged_case([1] * args.batch, [args.context] * args.batch)
    for name in args.dtypes.split(","):
        cache = kv_cache.to(torch.float8_e4m3fn) if name == "fp8" else kv_cache
        for _ in range(4):  # compile, then the launches ncu picks from
            paged_attention(query, cache, metadata, HEAD_DIM**-0.5)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
