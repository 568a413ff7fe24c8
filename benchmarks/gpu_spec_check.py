"""On the GPU, before any timing: greedy tokens with speculative decoding equal the tokens
without it, on the demo model with the demo draft, with n-gram lookup and with the demo
EAGLE head (when lanner/assets/demo-eagle or --eagle exists), through the fast path
(Triton kernels, decode and verify CUDA graphs, the draft's and the head's graphs) and
eagerly.

Run on the GPU machine from the repository root:
    PYTHONPATH=. python3 benchmarks/gpu_spec_check.py [--commit SHA]
The engines run --max-num-seqs requests at a time with output lengths that differ, so
requests end apart and a prompt's prefill shares its step with running decodes (under
CUDA graphs as one-token rows of a decode graph: ModelRunner._flattens_prefills); in
float32 the plain engine's tokens must also equal the eager plain engine's.
Prints one line per case (first differing token per prompt; None = all equal) and writes
JSON to benchmarks/results/ (and $OUT). In float32 every case must print all None and
"ok"; in bfloat16 a verify row and a one-token decode round differently, so a prompt may
part where the top two logits are within a bf16 step: the line shows that margin.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lanner import LLM, SamplingParams
from lanner.bench.report import card_name, save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_DRAFT = DEFAULT_MODEL_DIR.parent / "demo-draft"
DEMO_EAGLE = DEFAULT_MODEL_DIR.parent / "demo-eagle"
PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "x = [",
    "for i in range(10):\n    for j in range(10):\n        print(i, j)\nfor i in range(10):\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n"
    "        return json.load(f)\n\n\n",
]
# Fixed draft lengths, so that every step verifies (the adaptive rule may run plain
# steps); one adaptive case, whose steps switch between the two.
CONFIGS = {
    "draft_model k=4 fixed": {
        "method": "draft_model",
        "model": str(DEMO_DRAFT),
        "num_speculative_tokens": 4,
        "adaptive_draft_length": False,
    },
    "draft_model k=2 fixed": {
        "method": "draft_model",
        "model": str(DEMO_DRAFT),
        "num_speculative_tokens": 2,
        "adaptive_draft_length": False,
    },
    "ngram k=5 fixed": {
        "method": "ngram",
        "num_speculative_tokens": 5,
        "adaptive_draft_length": False,
    },
    "draft_model k=4 adaptive": {
        "method": "draft_model",
        "model": str(DEMO_DRAFT),
        "num_speculative_tokens": 4,
    },
}


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)


def top2_margin(llm: LLM, prompt_ids: list[int], prefix: list[int]) -> float:
    """The plain engine's gap between its top two logprobs at the first differing step."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt_ids + prefix}, params, use_tqdm=False)[0]
    top = out.outputs[0].logprobs[0]
    values = sorted((lp.logprob for lp in top.values()), reverse=True)
    return values[0] - values[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--eagle", type=Path, default=DEMO_EAGLE, help="EAGLE head (if present)")
    parser.add_argument("--max-num-seqs", type=int, default=3, help="requests at a time")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated; float32 is the check"
    )
    args = parser.parse_args()
    configs = dict(CONFIGS)
    if (args.eagle / "config.json").is_file():
        for k, adaptive in ((4, True), (3, False)):
            configs[f"eagle k={k}{'' if adaptive else ' fixed'}"] = {
                "method": "eagle",
                "model": str(args.eagle),
                "num_speculative_tokens": k,
                "adaptive_draft_length": adaptive,
            }
    lengths = [max(8, args.max_tokens - 17 * i) for i in range(len(PROMPTS))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    cases = []
    all_equal_fp32 = True
    plain_tokens: dict[tuple[str, bool], list[list[int]]] = {}
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        for eager in (False, True):
            # Two engines live at once here: each gets a cache of its own size.
            options = dict(
                dtype=dtype,
                device="cuda",
                max_model_len=1024,
                enforce_eager=eager,
                kv_cache_memory_bytes=4 << 30,
                max_num_seqs=args.max_num_seqs,
            )
            plain = LLM(**options)
            expected = plain.generate(PROMPTS, params, use_tqdm=False)
            plain_tokens[dtype, eager] = [e.outputs[0].token_ids for e in expected]
            for name, config in configs.items():
                llm = LLM(**options, speculative_config=config)
                started = time.perf_counter()
                got = llm.generate(PROMPTS, params, use_tqdm=False)
                elapsed = time.perf_counter() - started
                diffs = [
                    first_difference(g.outputs[0].token_ids, e.outputs[0].token_ids)
                    for g, e in zip(got, expected, strict=True)
                ]
                margins = [
                    None
                    if d is None
                    else top2_margin(plain, e.prompt_token_ids, e.outputs[0].token_ids[:d])
                    for d, e in zip(diffs, expected, strict=True)
                ]
                stats = llm.engine.core.spec.policy.stats
                ok = all(d is None for d in diffs)
                if dtype == "float32" and not ok:
                    all_equal_fp32 = False
                case = {
                    "dtype": dtype,
                    "enforce_eager": eager,
                    "config": name,
                    "first_difference": diffs,
                    "top2_margin_there": margins,
                    "mean_acceptance_length": stats.mean_acceptance_length,
                    "speculative_steps": stats.num_speculative_steps,
                    "plain_steps": stats.num_plain_steps,
                    "seconds": elapsed,
                }
                cases.append(case)
                print(
                    f"{dtype:9} eager={eager!s:5} {name:24} first difference {diffs} "
                    f"margins {[None if m is None else round(m, 4) for m in margins]} "
                    f"accept len {stats.mean_acceptance_length:.2f} "
                    f"steps spec/plain {stats.num_speculative_steps}/{stats.num_plain_steps} "
                    f"{'ok' if ok else 'DIFFERS'}",
                    flush=True,
                )
                llm.engine.core.shutdown()
            plain.engine.core.shutdown()
            torch.cuda.empty_cache()
    graphs_equal_eager = "float32" in dtypes and (
        plain_tokens["float32", False] == plain_tokens["float32", True]
    )
    all_equal_fp32 = all_equal_fp32 and graphs_equal_eager
    print(f"float32 plain: graphs (refills flattened) equal eager: {graphs_equal_eager}")
    result = {
        "workload": "gpu-spec-check (greedy with speculation == without, demo model)",
        "card": card_name(),
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/gpu_spec_check.py " + " ".join(sys.argv[1:]),
        "max_num_seqs": args.max_num_seqs,
        "float32_plain_graphs_equal_eager": graphs_equal_eager,
        "float32_all_equal": all_equal_fp32,
        "cases": cases,
    }
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-spec-check.json")
    print("float32: all equal" if all_equal_fp32 else "float32: DIFFERENCES (a bug)")


if __name__ == "__main__":
    main()
