"""W7 at batch 1 with the EAGLE proposer: decode speed with an EAGLE head beside no
speculation and the demo draft model, and the head's own step cost, on the demo model and
on a Llama-3-8B-shaped target with random weights and a random head.

Run on the GPU machine from the repository root (under 2 minutes on an H200):
    PYTHONPATH=. python3 benchmarks/eagle_decode.py --head lanner/assets/demo-eagle \\
        --commit $(git rev-parse --short HEAD)

Demo part (W7's held-out prompts, batch 1, greedy, ignore_eos, CUDA graphs): output tok/s
of no speculation, the demo draft at k = --draft-k and the head at each k of --ks (fixed
draft length); per row the speed-up, the mean accepted length (accepted drafts + 1 per
verify step) and the mean step time. Beside them, timed directly through the head's
runner (median of 50 replays): one catch-up forward over k + 1 verified positions and
one k-draft chain, against the target's one-token decode step.
8B part (random weights; acceptance means nothing there): the target's decode step and
its verify steps of k + 1 tokens, the head's catch-up and chain for EAGLE-1 and EAGLE-3
heads of the 8B shape, and the speed-up those costs imply at the acceptance rate the demo
head reached: E(k) = (1 - a^(k+1)) / (1 - a) tokens per (verify + head) time.
Writes <stamp>-W7-eagle.json to benchmarks/results/ (and $OUT) and prints tables.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lanner.bench.report import card_name, save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core import EngineCore
from lanner.runner.model_runner import SequenceChunk
from lanner.runner.sampler import SamplingRow
from lanner.sampling_params import SamplingParams
from lanner.spec.eagle import EagleProposer
from lanner.spec.eagle_runner import CatchUp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
SHAPE_8B = ROOT / "benchmarks/shapes/llama3-8b"
REPEATS = 50
CONTEXT = 512  # tokens before the timed steps (a 1024-position limit)


def spec_decode_module():
    """benchmarks/spec_decode.py (W7's prompts and its timed engine runs)."""
    spec = importlib.util.spec_from_file_location("spec_decode", ROOT / "benchmarks/spec_decode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int = REPEATS) -> float:
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def head_costs(core: EngineCore, ks: list[int], device: str) -> dict[int, dict[str, float]]:
    """Per k, the head's catch-up over k + 1 verified positions and its k-draft chain for
    one request at CONTEXT tokens, timed through its runner (graphs where captured)."""
    proposer = core.spec.proposer
    assert isinstance(proposer, EagleProposer)
    runner, head = proposer.runner, proposer.head
    block = core.kv_manager.block_size
    table = list(range(-(-(CONTEXT + 2 * max(ks) + 2) // block)))
    width = head.hidden_size if head.layout == "eagle" else head.fc.in_features
    dtype = head.fc.weight.dtype
    features = torch.randn((max(ks) + 1, width), dtype=dtype, device=device)
    costs = {}
    for k in ks:
        batch = CatchUp()
        last = batch.add_run([5] * (k + 1), CONTEXT, 0, table)
        outputs = runner.catch_up(batch, features)
        base = CONTEXT + k + 1
        catch_up_ms = median_ms(lambda b=batch: runner.catch_up(b, features), device)
        chain_ms = median_ms(
            lambda k=k, base=base, out=outputs, row=last: runner.draft(
                out, [row], [base], [base + k - 2], [table], k
            ),
            device,
        )
        costs[k] = {
            "catch_up_ms": catch_up_ms,
            "chain_ms": chain_ms,
            "head_ms": catch_up_ms + chain_ms,
        }
    return costs


def decode_and_verify_ms(core: EngineCore, ks: list[int], device: str) -> dict[int, float]:
    """The target's step for one request at CONTEXT tokens: k = 0 a decode step, else a
    verify step of k + 1 tokens (through the runner; graphs where captured)."""
    runner = core.runner
    block = core.kv_manager.block_size
    most = max(ks, default=0)
    table = list(range(-(-(CONTEXT + most + 2) // block)))
    row = SamplingRow(SamplingParams(temperature=0.0), [0], [1] * (most + 1), ())
    times = {}
    for k in [0, *ks]:
        chunk = SequenceChunk("s0", [5] * (k + 1), CONTEXT, table, row, num_draft_tokens=k)
        times[k] = median_ms(lambda c=chunk: runner.execute([c]), device, REPEATS // 2)
    return times


def make_core(
    model: str,
    device: str,
    speculative_config: dict | None,
    max_model_len: int = 2048,
    **extra: object,
) -> EngineCore:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    extra.setdefault("kv_cache_memory_bytes", (4 << 30) if device == "cuda" else 64 << 20)
    config = EngineConfig.from_kwargs(
        model=model,
        dtype="bfloat16" if device == "cuda" else "float32",
        device=device,
        max_model_len=max_model_len,
        max_num_seqs=1,
        max_num_batched_tokens=2048,
        speculative_config=speculative_config,
        **extra,
    )
    return EngineCore(config)


def release(core: EngineCore, device: str) -> None:
    core.shutdown()
    del core
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def eagle_config(head: Path | str, k: int, method: str = "eagle") -> dict:
    return {
        "method": method,
        "model": str(head),
        "num_speculative_tokens": k,
        "adaptive_draft_length": False,
    }


def demo_part(args: argparse.Namespace, spec_decode) -> dict:
    spec_decode.DEVICE = args.device
    prompts, split = spec_decode.heldout_prompts(args.num_prompts)
    model = str(DEFAULT_MODEL_DIR)
    print(f"demo: {len(prompts)} held-out prompts, {args.output_len} output tokens, batch 1")
    rows: list[dict] = []

    def measure(name: str, k: int | None, spec: dict | None) -> dict:
        core = make_core(model, args.device, spec)
        figures = spec_decode.run(core, prompts, args.output_len, 0.0)
        row = {"method": name, "k": k, **figures}
        if name == "eagle" and k is not None:
            row["head_cost"] = head_costs(core, [k], args.device)[k]
        if name == "none":
            row["target_step_ms"] = decode_and_verify_ms(core, [], args.device)[0]
        release(core, args.device)
        plain = rows[0]["output_tok_per_s"] if rows else figures["output_tok_per_s"]
        row["speedup"] = figures["output_tok_per_s"] / plain
        rows.append(row)
        length = figures.get("mean_acceptance_length")
        cost = row.get("head_cost")
        print(
            f"  {name:11} k={k!s:4} {figures['output_tok_per_s']:8.0f} tok/s  "
            f"x{row['speedup']:.2f}  accept len {length and round(length, 2)}  "
            f"step {figures['step_ms_mean']:.3f} ms"
            + (
                f"  head: catch-up {cost['catch_up_ms']:.3f} ms + chain {cost['chain_ms']:.3f} ms"
                if cost
                else ""
            ),
            flush=True,
        )
        return row

    measure("none", None, None)
    measure(
        "draft_model", args.draft_k, spec_decode.spec_config("draft_model", args.draft_k, False)
    )
    for k in args.ks:
        measure("eagle", k, eagle_config(args.head, k))
    best = max((r for r in rows if r["method"] == "eagle"), key=lambda r: r["speedup"])
    print(f"  best EAGLE k={best['k']}: x{best['speedup']:.2f}", flush=True)
    return {"split": split, "head": str(args.head), "rows": rows, "best_eagle": best}


def shape_positions(shape_dir: Path) -> int:
    return int(json.loads((shape_dir / "config.json").read_text())["max_position_embeddings"])


def write_random_head(shape_dir: Path, out_dir: Path, layout: str) -> Path:
    """config.json of a one-layer head of the target's shape (weights: load_format dummy)."""
    config = json.loads((shape_dir / "config.json").read_text())
    config.update(num_hidden_layers=1)
    if layout == "eagle3":
        config.update(
            architectures=["LlamaForCausalLMEagle3"],
            draft_vocab_size=min(32000, config["vocab_size"]),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def shape_part(args: argparse.Namespace, acceptance: float | None) -> dict:
    results: dict = {"target": str(args.shape_dir), "context": CONTEXT, "heads": {}}
    rates = {"0.6": 0.6, "0.7": 0.7, "0.8": 0.8}
    if acceptance:
        rates["demo head"] = acceptance
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.shape_layouts:
            try:
                head = write_random_head(args.shape_dir, Path(tmp) / layout, layout)
                core = make_core(
                    str(args.shape_dir),
                    args.device,
                    eagle_config(head, max(args.ks), layout),
                    max_model_len=min(1024, shape_positions(args.shape_dir)),
                    load_format="dummy",
                    kv_cache_memory_bytes=None,
                    num_gpu_blocks_override=64,
                )
                target = decode_and_verify_ms(core, args.ks, args.device)
                costs = head_costs(core, args.ks, args.device)
                release(core, args.device)
            except Exception as error:  # one layout failing leaves the other's figures
                traceback.print_exc()
                results["heads"][layout] = {"error": repr(error)}
                continue
            decode = target[0]
            implied = {
                name: {
                    k: (1 - a ** (k + 1)) / (1 - a) * decode / (target[k] + costs[k]["head_ms"])
                    for k in args.ks
                }
                for name, a in rates.items()
            }
            results["heads"][layout] = {
                "decode_ms": decode,
                "verify_ms": {k: target[k] for k in args.ks},
                "head": costs,
                "implied_speedup": implied,
            }
            print(f"8B shape, {layout} head: decode {decode:.3f} ms", flush=True)
            for k in args.ks:
                c = costs[k]
                print(
                    f"  k={k}: verify {target[k]:.3f} ms, head catch-up {c['catch_up_ms']:.3f} ms "
                    f"+ chain {c['chain_ms']:.3f} ms ({c['head_ms'] / decode:.2f} decode steps); "
                    + ", ".join(f"a={n}: x{s[k]:.2f}" for n, s in implied.items()),
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head", type=Path, default=DEFAULT_MODEL_DIR.parent / "demo-eagle")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ks", default="2,3,4,5")
    parser.add_argument("--draft-k", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--shape-dir", type=Path, default=SHAPE_8B)
    parser.add_argument("--shape-layouts", default="eagle,eagle3")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-shape", action="store_true")
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.shape_layouts = [m for m in args.shape_layouts.split(",") if m]
    started = time.perf_counter()
    result: dict = {
        "workload": "W7 eagle, batch 1",
        "card": card_name(),
        "commit": args.commit,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    acceptance = None
    if not args.skip_demo:
        result["demo"] = demo_part(args, spec_decode_module())
        acceptance = result["demo"]["best_eagle"].get("acceptance_rate")
    if not args.skip_shape:
        result["shape_8b"] = shape_part(args, acceptance)
    result["seconds"] = round(time.perf_counter() - started, 1)
    save_copies(result, RESULTS, f"{time.strftime('%Y%m%d-%H%M%S')}-W7-eagle.json")
    print(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
