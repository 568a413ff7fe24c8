"""The adaptive draft-length rule on the CPU, under injected step costs: the demo model (and
its draft or EAGLE head) decodes bursty code one request at a time, and each step's wall
time is what the H200 measured for such steps (plain 0.6 ms, drafting k tokens
1.0 + 0.04 k ms; --plain-ms / --draft-ms / --per-draft-ms), not what the CPU takes. It
counts how many steps the rule ran plain where drafting pays ~2x, and prints the draft
length of every step, so a change of the rule can be compared on the same tokens.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/spec_policy_sim.py \
        --methods ngram,eagle --commit $(git rev-parse --short HEAD)

(Copied into another checkout's benchmarks/, it runs that checkout's rule on the same
prompts.)
Writes benchmarks/results/<stamp>-spec-policy-sim.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lanner import LLM, SamplingParams  # noqa: E402
from lanner.bench.report import new_result, save_copies  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BURSTY = REPO / "tests" / "spec" / "data" / "bursty_code.txt"
HEADS = {
    "eagle": REPO / "lanner/assets/demo-eagle",
    "draft_model": REPO / "lanner/assets/demo-draft",
}


def simulate(method: str, k: int, prompts: list[str], max_tokens: int, cost) -> dict:
    config: dict = {"method": method, "num_speculative_tokens": k}
    if method in HEADS:
        config["model"] = str(HEADS[method])
    llm = LLM(
        dtype="float32",
        device="cpu",
        max_model_len=1024,
        max_num_seqs=1,
        async_scheduling=True,
        speculative_config=config,
    )
    policy = llm.engine.core.spec.policy
    policy.step_cost = cost
    lengths: list[int] = []
    begin_step = policy.begin_step

    def recorded(num_running: int, draft_length: int) -> None:
        lengths.append(draft_length)
        begin_step(num_running, draft_length)

    policy.begin_step = recorded
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    stats = policy.stats
    seconds = sum(cost(1, length) for length in lengths)
    return {
        "method": method,
        "k": k,
        "speculative_steps": stats.num_speculative_steps,
        "plain_steps": stats.num_plain_steps,
        "mean_acceptance_length": stats.mean_acceptance_length,
        "simulated_seconds": seconds,
        "output_tokens": max_tokens * len(prompts),
        "draft_lengths": "".join(str(length) for length in lengths),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="ngram,eagle")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--plain-ms", type=float, default=0.6)
    parser.add_argument("--draft-ms", type=float, default=1.0)
    parser.add_argument("--per-draft-ms", type=float, default=0.04)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source = BURSTY.read_text()
    prompts = [source[i * 300 : i * 300 + 700] for i in range(args.prompts)]

    def cost(num_running: int, k: int) -> float:
        ms = args.plain_ms if k == 0 else args.draft_ms + args.per_draft_ms * k
        return ms / 1e3

    rows = []
    for method in args.methods.split(","):
        row = simulate(method, args.k, prompts, args.max_tokens, cost)
        rows.append(row)
        print(
            f"{method:11} k<={args.k}: speculative steps {row['speculative_steps']}, plain "
            f"{row['plain_steps']}, mean accepted length {row['mean_acceptance_length']:.2f}, "
            f"simulated {row['simulated_seconds'] * 1e3:.0f} ms for "
            f"{row['output_tokens']} tokens\n  {row['draft_lengths']}",
            flush=True,
        )
    result = new_result("spec-policy-sim", "demo-model")
    result.update(
        card="cpu, step times injected (H200-like)",
        commit=args.commit,
        step_cost_ms={
            "plain": args.plain_ms,
            "draft": args.draft_ms,
            "per_draft": args.per_draft_ms,
        },
        rows=rows,
    )
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-spec-policy-sim.json"
    save_copies(result, RESULTS, name)
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
