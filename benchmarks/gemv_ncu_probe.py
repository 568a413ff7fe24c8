"""One decode-linear call at a W1 shape (llama3-8b, one row) for Nsight Compute to profile:
the int4 GEMV, the int4 tile path, fp8 W8A8 or bf16, each at what the engine runs (the
committed tuned table). Warm-up calls run first; only the calls between
cudaProfilerStart and cudaProfilerStop are profiled (ncu --profile-from-start off), each
on its own weight copy, so every one reads its weight from HBM.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/gemv_ncu_probe.py --path int4-gemv --linear gate_up
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.kernels_linear import SHAPES
from benchmarks.kernels_quant import DEVICE, DTYPE, QuantWeights
from lanner.kernels import skinny_matmul

PATHS = ("int4-gemv", "int4-tile", "fp8", "bf16")


def call_for(path: str, n: int, k: int):  # noqa: ANN201
    """(weight copies, the call on one copy) for a path."""
    if path == "bf16":
        w = QuantWeights("fp8", n, k)
        return w.dense, lambda x, dense: skinny_matmul.skinny_matmul(x, dense)
    w = QuantWeights("fp8" if path == "fp8" else "int4", n, k)
    config = {"gemv": path == "int4-gemv"} if path.startswith("int4") else {}
    return w.copies, lambda x, tensors: w.skinny(x, tensors, **config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", choices=PATHS, default="int4-gemv")
    parser.add_argument("--linear", default="gate_up", choices=sorted(SHAPES["llama3-8b"]))
    parser.add_argument("--calls", type=int, default=2, help="profiled calls")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, k = SHAPES["llama3-8b"][args.linear]
    copies, call = call_for(args.path, n, k)
    x = torch.randn(1, k, device=DEVICE).to(DTYPE)
    for copy in copies:  # compile and warm every copy
        call(x, copy)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for i in range(args.calls):
        call(x, copies[(i + 1) % len(copies)])
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
