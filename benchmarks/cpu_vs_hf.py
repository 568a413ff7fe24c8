"""lanner on the CPU against HF transformers `generate`: same machine, same process, the
embedded demo model, greedy, 128 new tokens, batch 1 and 32 prompts, in float32 and in
each engine's default dtype, greedy outputs compared token for token.

The machine may be shared: the thread count is pinned (--threads, both engines), the
engines run interleaved (their order alternating) and every figure is repeated
(--repeats); each sample records the load average, and the JSON keeps every sample so
the spread is visible. TPOT is (time for 128 tokens - time for 1) / 127 for both
engines, measured the same way from outside; output tok/s is 128 x prompts over the
time for 128 tokens. CPU time (this thread's) is recorded beside wall time: on a busy
machine it shows the work each engine did, whatever else ran.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_vs_hf.py --commit $(git rev-parse --short HEAD)

Writes benchmarks/results/<stamp>-cpu-vs-hf.json and prints a table with the targets
(lanner's TPOT <= HF's at batch 1, >= 2x HF's output tok/s at 32 prompts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lanner.bench.report import cpu_name, new_result, save_stamped  # noqa: E402
from lanner.engine.config import DEFAULT_MODEL_DIR  # noqa: E402
from lanner.kernels import cpu_linear  # noqa: E402
from lanner.model.loader import cpu_has_native_bf16  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from cpu_gemm import lanner_step_linears_ms  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# Beginnings of Python files, as the demo model was trained on; 32 of varied length.
PROMPTS = [
    "def fibonacci(n):",
    "class Stack:",
    "import os\n\ndef list_files(path):",
    "for i in range(10):",
    "def read_json(path):\n    with open(path) as f:",
    "import numpy as np\n\n",
    "class LinkedList:\n    def __init__(self):",
    "def is_prime(n):\n    if n < 2:",
    "try:\n    import yaml\nexcept ImportError:",
    "def parse_args():\n    parser = argparse.ArgumentParser(",
    "with open('data.csv') as f:",
    "@property\ndef name(self):",
    "def merge_sort(items):",
    "from collections import defaultdict\n\n",
    "if __name__ == '__main__':",
    "def __repr__(self):\n    return",
    'class Config(object):\n    """',
    "import logging\n\nlogger = logging.getLogger(__name__)\n\n",
    "def test_add():\n    assert",
    "async def fetch(session, url):",
    "def flatten(nested):\n    result = []",
    "while True:\n    line = input()",
    "def binary_search(items, target):\n    low, high = 0,",
    "class Node:\n    def __init__(self, value, next=None):",
    "def main():\n    args = parse_args()",
    "raise ValueError(",
    "def download(url, path, chunk_size=8192):",
    "lambda x:",
    "def __init__(self, *args, **kwargs):\n    super().__init__(",
    "import sys\nimport time\n\nstart = time.time()",
    "def quicksort(arr):\n    if len(arr) <= 1:",
    "return sorted(",
]

# Each engine's setting per dtype column: lanner's dtype option, HF's from_pretrained dtype
# (None: not passed; transformers 5 then reads the checkpoint's, bfloat16 here).
DTYPE_SETTINGS = {
    "float32": {"lanner": "float32", "hf": "float32"},
    "bfloat16": {"lanner": "bfloat16", "hf": "bfloat16"},
    "default": {"lanner": None, "hf": None},
}


class LannerRunner:
    name = "lanner"

    def __init__(self, dtype: str | None, threads: int) -> None:
        from lanner import LLM

        options: dict[str, Any] = {"num_threads": threads}
        if dtype is not None:
            options["dtype"] = dtype
        self.llm = LLM(**options)
        self.dtype = str(self.llm.engine.core.loaded.dtype).removeprefix("torch.")

    def generate(self, prompts: list[str], new_tokens: int) -> list[list[int]]:
        from lanner import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]


class HFRunner:
    name = "hf"

    def __init__(self, dtype: str | None, threads: int) -> None:
        import transformers

        del threads  # set process-wide by main
        options = {} if dtype is None else {"dtype": dtype}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(DEFAULT_MODEL_DIR), **options
        ).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
        self.tokenizer.padding_side = "left"
        self.dtype = str(self.model.dtype).removeprefix("torch.")

    def generate(self, prompts: list[str], new_tokens: int) -> list[list[int]]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,  # no early stop: every row makes new_tokens (ignore_eos)
                pad_token_id=self.tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]
        return [row[width:].tolist() for row in out]


def timed(runner: Any, prompts: list[str], new_tokens: int) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.thread_time()
    tokens = runner.generate(prompts, new_tokens)
    return time.perf_counter() - wall, time.thread_time() - cpu, tokens


def measure(runner: Any, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """One sample: generate 1 token, then new_tokens, from the same prompts."""
    load_before = os.getloadavg()[0]
    first_wall, first_cpu, _ = timed(runner, prompts, 1)
    wall, cpu, tokens = timed(runner, prompts, new_tokens)
    steps = new_tokens - 1
    return {
        "tpot_ms": (wall - first_wall) / steps * 1e3,
        "tpot_cpu_ms": (cpu - first_cpu) / steps * 1e3,
        "output_tok_per_s": len(prompts) * new_tokens / wall,
        "output_tok_per_cpu_s": len(prompts) * new_tokens / cpu,
        "wall_s": wall,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
        "_tokens": tokens,
    }


def summary(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "spread_pct": (max(values) - min(values)) / statistics.median(values) * 100,
    }


def linear_dtype_probe(repeats: int = 15) -> dict[str, Any]:
    """The demo model's linears (one decode step's worth) in float32 and bfloat16, at 1
    and 32 rows: the measurement behind the CPU's dtype rule (model/loader.py); with the
    LM head (``..._with_lm_head_ms``), the matmuls any engine's decode step must run: the
    floor that bounds lanner's speed-up over HF (both run the same matmuls)."""
    config = __import__("json").loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    shapes = [
        ((heads + 2 * kv_heads) * head_dim, hidden),
        (hidden, heads * head_dim),
        (2 * inter, hidden),
        (hidden, inter),
    ]

    def linear_seconds(out_features: int, in_features: int, rows: int, dtype: torch.dtype) -> float:
        """Best of ``repeats`` thread-time samples of one linear, each 10 calls' mean."""
        weight = torch.randn(out_features, in_features).to(dtype)
        x = torch.randn(rows, in_features).to(dtype)
        best = float("inf")
        for _ in range(repeats):
            started = time.thread_time()
            for _ in range(10):
                torch.nn.functional.linear(x, weight)
            best = min(best, (time.thread_time() - started) / 10)
        return best

    result: dict[str, Any] = {}
    for rows in (1, 32):
        for dtype in (torch.float32, torch.bfloat16):
            layer = sum(linear_seconds(n, k, rows, dtype) for n, k in shapes)
            total = layer * config["num_hidden_layers"]
            name = f"{str(dtype).removeprefix('torch.')}_rows{rows}"
            result[f"{name}_ms"] = total * 1e3
            head = linear_seconds(config["vocab_size"], hidden, rows, dtype)
            result[f"{name}_with_lm_head_ms"] = (total + head) * 1e3
    return result


def speedup_bounds(
    figures: dict[str, Any],
    probe: dict[str, Any],
    big: int,
    streamed_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per float32 / bfloat16 column: HF's CPU seconds per token at ``big`` prompts over
    the matmuls' alone (the probe's step with the LM head, per ``big`` tokens): the
    speed-up over HF that lanner would reach with nothing but its matmuls. The probe
    repeats one weight, which then sits in the caches; ``streamed_ms`` (by dtype) is
    lanner's own linears with every weight read from memory, as a real step reads them
    (benchmarks/cpu_gemm.py), and gives the tighter bound beside it."""
    bounds = {}
    for dtype in ("float32", "bfloat16"):
        floor_ms = probe.get(f"{dtype}_rows32_with_lm_head_ms")
        hf = figures.get(f"hf/{dtype}/batch{big}")
        if floor_ms is None or hf is None or big != 32:
            continue
        hf_rate = hf["output_tok_per_cpu_s"]["median"]
        floor_rate = big / (floor_ms / 1e3)
        bounds[dtype] = {
            "matmul_floor_tok_per_cpu_s": floor_rate,
            "hf_tok_per_cpu_s": hf_rate,
            "max_speedup_over_hf": floor_rate / hf_rate,
        }
        if streamed_ms and dtype in streamed_ms:
            streamed_rate = big / (streamed_ms[dtype] / 1e3)
            bounds[dtype]["streamed_linears_ms"] = streamed_ms[dtype]
            bounds[dtype]["max_speedup_over_hf_streamed"] = streamed_rate / hf_rate
    return bounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both engines")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16,default", help="columns of DTYPE_SETTINGS"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commit", default=None, help="recorded in the JSON")
    args = parser.parse_args(argv)
    if args.commit:
        os.environ["LANNER_COMMIT"] = args.commit
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    columns = args.dtypes.split(",")

    runners: dict[tuple[str, str], Any] = {}
    for column in columns:
        for cls in (LannerRunner, HFRunner):
            runner = cls(DTYPE_SETTINGS[column][cls.name], args.threads)
            # Warm-up at one prompt and at two: a single row's GEMMs and a batch's (lanner
            # packs each weight for each on first use).
            runner.generate(PROMPTS[:1], 4)
            runner.generate(PROMPTS[:2], 4)
            runners[(cls.name, column)] = runner

    samples: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for batch in batch_sizes:
            for column in columns:
                order = ("lanner", "hf") if repeat % 2 == 0 else ("hf", "lanner")
                for engine in order:
                    key = f"{engine}/{column}/batch{batch}"
                    sample = measure(runners[(engine, column)], PROMPTS[:batch], args.max_tokens)
                    samples.setdefault(key, []).append(sample)
                    tpot, rate = sample["tpot_ms"], sample["output_tok_per_s"]
                    load = sample["load_avg_1m"][0]
                    print(
                        f"[{repeat}] {key:24s} TPOT {tpot:7.2f} ms  {rate:7.1f} tok/s  "
                        f"(load {load:.1f})",
                        flush=True,
                    )

    # Greedy outputs: the last sample's tokens of each engine, per column and batch size.
    agreement: dict[str, Any] = {}
    for column in columns:
        for batch in batch_sizes:
            ours = samples[f"lanner/{column}/batch{batch}"][-1]["_tokens"]
            theirs = samples[f"hf/{column}/batch{batch}"][-1]["_tokens"]
            equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
            agreement[f"{column}/batch{batch}"] = {
                "lanner_dtype": runners[("lanner", column)].dtype,
                "hf_dtype": runners[("hf", column)].dtype,
                "prompts_equal": equal,
                "prompts": batch,
            }
    for rows in samples.values():
        for sample in rows:
            sample.pop("_tokens")

    figures: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for key, rows in samples.items():
        figures[key] = {
            "samples": rows,
            **{name: summary(rows, name) for name in ("tpot_ms", "tpot_cpu_ms")},
            **{name: summary(rows, name) for name in ("output_tok_per_s", "output_tok_per_cpu_s")},
        }
    for column in columns:
        if 1 in batch_sizes:
            ours = figures[f"lanner/{column}/batch1"]["tpot_ms"]["median"]
            theirs = figures[f"hf/{column}/batch1"]["tpot_ms"]["median"]
            targets[f"{column}: lanner TPOT <= HF's at batch 1"] = {
                "lanner_ms": ours,
                "hf_ms": theirs,
                "ratio": ours / theirs,
                "met": ours <= theirs,
            }
        big = max(batch_sizes)
        if big > 1:
            ours = figures[f"lanner/{column}/batch{big}"]["output_tok_per_s"]["median"]
            theirs = figures[f"hf/{column}/batch{big}"]["output_tok_per_s"]["median"]
            targets[f"{column}: lanner tok/s >= 2x HF's at {big} prompts"] = {
                "lanner_tok_per_s": ours,
                "hf_tok_per_s": theirs,
                "ratio": ours / theirs,
                "met": ours >= 2 * theirs,
            }

    print("\nmedian over repeats (min-max):")
    for key, row in figures.items():
        tpot, rate = row["tpot_ms"], row["output_tok_per_s"]
        print(
            f"  {key:24s} TPOT {tpot['median']:7.2f} ms ({tpot['min']:.2f}-{tpot['max']:.2f})  "
            f"{rate['median']:8.1f} tok/s ({rate['min']:.1f}-{rate['max']:.1f})"
        )
    for name, agree in agreement.items():
        print(
            f"  greedy {name}: {agree['prompts_equal']}/{agree['prompts']} prompts equal "
            f"(lanner {agree['lanner_dtype']}, HF {agree['hf_dtype']})"
        )
    for name, target in targets.items():
        print(f"  {'MET ' if target['met'] else 'MISS'} {name}: ratio {target['ratio']:.2f}")

    import transformers

    probe = linear_dtype_probe()
    streamed_ms = {"float32": lanner_step_linears_ms(max(batch_sizes))}
    if cpu_has_native_bf16():  # (else lanner's bf16 column computes in float32)
        streamed_ms["bfloat16"] = lanner_step_linears_ms(max(batch_sizes), dtype=torch.bfloat16)
    bounds = speedup_bounds(figures, probe, max(batch_sizes), streamed_ms)
    for dtype, bound in bounds.items():
        print(
            f"  {dtype}: the matmuls alone would make {bound['matmul_floor_tok_per_cpu_s']:.0f} "
            f"tok per CPU s at {max(batch_sizes)} prompts, HF {bound['hf_tok_per_cpu_s']:.0f}: "
            f"at most {bound['max_speedup_over_hf']:.2f}x"
        )
        if "streamed_linears_ms" in bound:
            print(
                f"  {dtype}: lanner's linears with each weight read from memory take "
                f"{bound['streamed_linears_ms']:.1f} ms a step: at most "
                f"{bound['max_speedup_over_hf_streamed']:.2f}x"
            )
    result = new_result("cpu-vs-hf", str(DEFAULT_MODEL_DIR.name))
    result.update(
        threads=args.threads,
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        figures=figures,
        greedy_agreement=agreement,
        targets=targets,
        linear_dtype_probe=probe,
        speedup_bounds=bounds,
        cpu_gemm=cpu_linear.chosen().names(),
    )
    save_stamped(result, RESULTS, "cpu-vs-hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
