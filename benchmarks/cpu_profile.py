"""cProfile of lanner on the CPU: the demo model, 32 prompts (--prompts), greedy, 128 new
tokens, one thread, float32 (what cpu_vs_hf.py's rows run): where a decode step's time
goes beyond the matmuls. Times one unprofiled run first, then prints the 25 most
expensive calls by own time (--sort cumulative: lanner's own functions by cumulative time).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/cpu_profile.py [--prompts 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from lanner import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--sort", choices=("tottime", "cumulative"), default="tottime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM(dtype="float32", device="cpu", max_num_seqs=32)
    prompts = [f"def function_{i}(x):\n    return" for i in range(args.prompts)]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    wall = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    print(f"unprofiled: {(time.perf_counter() - wall) / 128 * 1e3:.2f} ms a step (128 steps)")
    cpu, wall = time.process_time(), time.perf_counter()
    profile = cProfile.Profile()
    profile.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"{tokens} tokens, {time.process_time() - cpu:.2f} CPU s, "
        f"{time.perf_counter() - wall:.2f} s wall (under cProfile)"
    )
    stats = pstats.Stats(profile).sort_stats(args.sort)
    if args.sort == "cumulative":
        stats.print_stats("lanner", 40)
    else:
        stats.print_stats(25)


if __name__ == "__main__":
    main()
