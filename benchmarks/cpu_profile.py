"""cProfile of lanner on the CPU: the demo model, 32 prompts, greedy, 128 new tokens, one
thread, float32 (what cpu_vs_hf.py's 32-prompt row runs): where a decode step's time goes
beyond the matmuls. Prints the 25 most expensive calls by own time.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/cpu_profile.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from lanner import LLM, SamplingParams


def main() -> None:
    torch.set_num_threads(1)
    llm = LLM(dtype="float32", device="cpu", max_num_seqs=32)
    prompts = [f"def function_{i}(x):\n    return" for i in range(32)]
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
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
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
