"""W7 (speculative decoding on the demo model) and the 8B-shape verify-step timing.

Run on the GPU machine from the repository root (all of it fits in ~8 minutes on an H200):
    PYTHONPATH=. python3 benchmarks/spec_decode.py --commit $(git rev-parse --short HEAD)
Trim with --ks 2,4 --batches 16,256 --num-prompts 16 --output-len 128, or --skip-8b /
--skip-w7. Writes one JSON per part to benchmarks/results/ (and $OUT) and prints tables.

W7 (../shared/BENCHMARKS.md): the demo model, 64 prompts cut from the Python files that
scripts/train_demo_model.py held out (its split is recomputed here from this machine's
files, as the training run did), 256 greedy output tokens each, ignore_eos.
- Batch 1 (one request at a time): no speculation, then n-gram lookup and the demo
  draft at k = 1..6 with a fixed draft length. Per row: output tok/s and the speed-up,
  mean accepted tokens per verify step (accepted drafts + 1), the measured step costs
  (the target's one-token decode step and the draft's own decode step, each the median
  step of a plain run of that model at this batch size; and the speculative run's mean
  step), and the bound E[tokens/step] / (1 + k * draft_step / target_step) with the
  share of it reached.
- Batches 4, 16, 64 and 256 (max(64, batch) requests, the prompts repeated): no
  speculation, and n-gram and the draft at the best batch-1 k with the default adaptive
  draft length, so where speculation stops paying it switches itself off.
- Each speculating setting runs --rounds times (default 2) at each batch size, a plain run
  before, between and after the rounds; a row is its setting's fastest round and its
  speed-up is over the fastest plain run (the device machine's host speed drifts).
8B shape (random weights): one verify step of k + 1 = 2..9 tokens per request against a
one-token decode step at batch 1 and 16 (CUDA graphs; the verify rows eagerly through
the one-token decode kernel and through the extend kernel too), and the speed-up those
step times imply at acceptance rates 0.6 / 0.7 / 0.8 (and the demo model's measured
ones) with free drafts: E(k) = (1 - a^(k+1)) / (1 - a) tokens per verify step.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lanner.bench.report import card_name, save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core import EngineCore
from lanner.engine.request import Request
from lanner.model.tokenizer import load_tokenizer
from lanner.runner import model_runner
from lanner.runner.model_runner import SequenceChunk
from lanner.runner.sampler import SamplingRow
from lanner.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = Path(__file__).resolve().parent / "shapes"
DEMO_DRAFT = DEFAULT_MODEL_DIR.parent / "demo-draft"
DEMO_EAGLE = DEFAULT_MODEL_DIR.parent / "demo-eagle"
PROMPT_TOKENS = 256
REPEATS = 30  # timed verify steps per point (8B part)
MAX_MODEL_LEN = 1024


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# -- W7 prompts ----------------------------------------------------------------------------


def heldout_prompts(count: int, seed: int = 0) -> tuple[list[list[int]], dict]:
    """``count`` prompts of PROMPT_TOKENS tokens, each cut at a seeded offset from a
    different held-out file (files of at least 2 * PROMPT_TOKENS tokens)."""
    spec = importlib.util.spec_from_file_location(
        "train_demo_model", ROOT / "scripts/train_demo_model.py"
    )
    assert spec is not None and spec.loader is not None
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    corpus = trainer.collect_corpus(trainer.parse_args(["--device", "cpu"]))
    report = json.loads((DEFAULT_MODEL_DIR / "training_report.json").read_text())
    expected = report["corpus"]["heldout_files"]
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    rng = random.Random(seed)
    files = list(corpus.heldout)
    rng.shuffle(files)
    prompts = []
    for source in files:
        ids = tokenizer.encode(source.text)
        if len(ids) < 2 * PROMPT_TOKENS:
            continue
        start = rng.randrange(0, len(ids) - 2 * PROMPT_TOKENS + 1)
        prompts.append(ids[start : start + PROMPT_TOKENS])
        if len(prompts) == count:
            break
    split = {
        "heldout_files": len(corpus.heldout),
        "heldout_files_in_training_report": expected,
        "same_split_size": len(corpus.heldout) == expected,
    }
    if not split["same_split_size"]:
        print(
            f"WARNING: {len(corpus.heldout)} held-out files here, {expected} in the training "
            f"report: this machine's files differ from the training machine's"
        )
    return prompts, split


# -- engine runs ---------------------------------------------------------------------------


def make_core(model: str, batch: int, speculative_config: dict | None, **extra) -> EngineCore:
    # The cores run one after another in this process: an earlier one's cycles go now,
    # and each core's cache is sized in bytes, not as a share of whatever is left.
    gc.collect()
    torch.cuda.empty_cache()
    extra.setdefault("kv_cache_memory_bytes", 8 << 30)
    config = EngineConfig.from_kwargs(
        model=model,
        dtype="bfloat16",
        device=DEVICE,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch * 16),
        speculative_config=speculative_config,
        **extra,
    )
    return EngineCore(config)


def release(core: EngineCore) -> None:
    core.shutdown()
    del core
    gc.collect()
    torch.cuda.empty_cache()


def host_probe_ms() -> float:
    """The median time of a fixed pure-Python loop: how fast this host runs Python right
    now (the GPU machine's host has drifted by 2x between and within calls), to read
    beside a case's step times."""
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        sum(i * i for i in range(100_000))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def run(
    core: EngineCore,
    prompts: list[list[int]],
    output_len: int,
    temperature: float,
    output_lens: list[int] | None = None,
) -> dict:
    """All prompts through the core (at most max_num_seqs at once); output tok/s, the
    median and mean step times and the speculation counters over the run. ``output_lens``:
    each prompt's own output length instead of ``output_len``."""

    def sampling(max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=0,
            detokenize=False,
        )  # fmt: skip

    params = sampling(output_len)
    lengths = output_lens if output_lens is not None else [output_len] * len(prompts)
    by_length = {n: sampling(n) for n in set(lengths)}
    # Warm-up: two requests (compiles whatever the run will use).
    for i in range(2):
        core.add_request(Request(f"warm{i}", list(prompts[i % len(prompts)]), params))
    while core.has_unfinished_requests():
        core.step()
    spec = core.spec.policy.stats if core.spec is not None else None
    before = (
        (
            spec.num_drafts,
            spec.num_draft_tokens,
            spec.num_accepted_tokens,
            list(spec.num_accepted_tokens_per_pos),
        )
        if spec
        else None
    )
    for i, prompt in enumerate(prompts):
        core.add_request(Request(f"r{i}", list(prompt), by_length[lengths[i]]))
    step_times = []
    probe_before = host_probe_ms()
    _sync()
    started = time.perf_counter()
    while core.has_unfinished_requests():
        before_step = time.perf_counter()
        core.step()
        step_times.append(time.perf_counter() - before_step)
    _sync()
    elapsed = time.perf_counter() - started
    tokens = sum(lengths)
    result = {
        "requests": len(prompts),
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "output_tok_per_s": tokens / elapsed,
        "steps": len(step_times),
        "step_ms_median": statistics.median(step_times) * 1e3,
        "step_ms_mean": elapsed / max(1, len(step_times)) * 1e3,
        # The host's Python speed just before and after (host_probe_ms): a run whose
        # probe differs from another's ran on a faster or slower host.
        "host_probe_ms": [probe_before, host_probe_ms()],
    }
    if spec is not None and before is not None:
        drafts = spec.num_drafts - before[0]
        draft_tokens = spec.num_draft_tokens - before[1]
        accepted = spec.num_accepted_tokens - before[2]
        per_pos = [a - b for a, b in zip(spec.num_accepted_tokens_per_pos, before[3], strict=True)]
        # Steps that accepted every one of k drafts end in no rejection: the per-position
        # rate is accepted / (accepted + rejections) (exact for a fixed k).
        rejections = drafts - per_pos[-1]
        result.update(
            num_drafts=drafts,
            num_draft_tokens=draft_tokens,
            num_accepted_tokens=accepted,
            num_accepted_tokens_per_pos=per_pos,
            mean_acceptance_length=1 + accepted / drafts if drafts else None,
            accepted_share_of_drafts=accepted / draft_tokens if draft_tokens else None,
            acceptance_rate=accepted / (accepted + rejections) if accepted + rejections else None,
        )
        # Where the adaptive rule settled: each batch bucket's draft length (0: off), and
        # how many steps speculated over the whole core (warm-up included).
        policy = core.spec.policy
        result["draft_length_chosen"] = {
            str(key): bucket.choice for key, bucket in sorted(policy.buckets.items())
        }
        result["speculative_steps"] = spec.num_speculative_steps
        result["plain_steps"] = spec.num_plain_steps
    return result


def spec_config(method: str, k: int, adaptive: bool) -> dict:
    config: dict = {
        "method": method,
        "num_speculative_tokens": k,
        "adaptive_draft_length": adaptive,
    }
    if method == "draft_model":
        config["model"] = str(DEMO_DRAFT)
    elif method == "eagle":
        config["model"] = str(DEMO_EAGLE)
    return config


def w7(args: argparse.Namespace) -> dict:
    prompts, split = heldout_prompts(args.num_prompts)
    out_len, temperature = args.output_len, args.temperature
    print(f"W7: {len(prompts)} held-out prompts of {PROMPT_TOKENS} tokens, {out_len} output tokens")
    rows = []
    step_costs: dict[int, dict[str, float]] = {}
    best_k: dict[str, int] = {}

    def measure(
        model: str,
        batch: int,
        batch_prompts: list[list[int]],
        spec: dict | None = None,
        **extra,
    ) -> dict:
        core = make_core(model, batch, spec, **extra)
        figures = run(core, batch_prompts, out_len, temperature)
        release(core)
        return figures

    def record(batch: int, method: str, k: int | None, adaptive: bool, figures: dict) -> None:
        base = step_costs[batch]
        row = {"batch": batch, "method": method, "k": k, "adaptive": adaptive, **figures}
        length = figures.get("mean_acceptance_length")
        if method == "draft_model" and k and length:
            ratio = base["draft_step_ms"] / base["target_step_ms"]
            row["bound"] = length / (1 + k * ratio)
        rows.append(row)  # its speed-up once plain decoding has run again (below)
        print(
            f"  batch {batch:3} {method:11} k={k!s:4} {'adaptive' if adaptive else 'fixed':8} "
            f"{figures['output_tok_per_s']:9.0f} tok/s  "
            f"accept len {length if length is None else round(length, 2)}  "
            f"step {figures['step_ms_mean']:.3f} ms"
            + (
                f"  chose k {figures['draft_length_chosen']} "
                f"(steps spec/plain {figures['speculative_steps']}/{figures['plain_steps']})"
                if adaptive and "draft_length_chosen" in figures
                else ""
            )
            + (f"  bound x{row['bound']:.2f}" if "bound" in row else "")
            + "  host probe {:.1f}/{:.1f} ms".format(*figures["host_probe_ms"]),
            flush=True,
        )

    for batch in [1, *args.batches]:
        batch_prompts = (
            prompts if batch == 1 else (prompts * -(-batch // len(prompts)))[: max(64, batch)]
        )
        target = measure(str(DEFAULT_MODEL_DIR), batch, batch_prompts)
        draft = measure(str(DEMO_DRAFT), batch, batch_prompts)
        step_costs[batch] = {
            "plain_tok_per_s": target["output_tok_per_s"],
            "target_step_ms": target["step_ms_median"],
            "draft_step_ms": draft["step_ms_median"],
        }
        print(
            f"batch {batch}: no speculation {target['output_tok_per_s']:.0f} tok/s; decode "
            f"step (median) target {target['step_ms_median']:.3f} ms, draft "
            f"{draft['step_ms_median']:.3f} ms",
            flush=True,
        )
        rows.append({"batch": batch, "method": "none", **target})
        if batch == 1 and not args.skip_serial:
            # Plain decoding read step by step, as a speculating step is: what the lost
            # overlap alone costs.
            serial = measure(str(DEFAULT_MODEL_DIR), batch, batch_prompts, async_scheduling=False)
            rows.append({"batch": batch, "method": "none (not overlapped)", **serial})
            print(
                f"batch 1: no speculation, each step read before the next: "
                f"{serial['output_tok_per_s']:.0f} tok/s, step (median) "
                f"{serial['step_ms_median']:.3f} ms",
                flush=True,
            )
        if batch == 1:
            settings = [(m, k, False) for m in args.methods for k in args.ks]
            settings += [
                (m, args.adaptive_k[m], True) for m in args.methods if m in args.adaptive_k
            ]
        else:
            settings = [(m, best_k[m], True) for m in args.methods]
        # --rounds rounds of every setting, a plain run between rounds: each row is its
        # setting's fastest round, as plain decoding's figure is its fastest run.
        plain_runs = [target]
        runs: dict[tuple, list[dict]] = {setting: [] for setting in settings}
        for round_index in range(args.rounds):
            if round_index:
                plain_runs.append(measure(str(DEFAULT_MODEL_DIR), batch, batch_prompts))
            for setting in settings:
                spec = spec_config(*setting)
                runs[setting].append(measure(str(DEFAULT_MODEL_DIR), batch, batch_prompts, spec))
        for (method, k, adaptive), figures in runs.items():
            best = max(figures, key=lambda f: f["output_tok_per_s"])
            best["tok_per_s_rounds"] = [f["output_tok_per_s"] for f in figures]
            record(batch, method, k, adaptive, best)
        # The plain run again, after the speculating ones: the speed-ups of this batch
        # are against the fastest plain run (the host's speed drifts over a run of runs,
        # and the first run at a batch size meets its kernels' first launches).
        again = measure(str(DEFAULT_MODEL_DIR), batch, batch_prompts)
        plain_runs.append(again)
        rows.append({"batch": batch, "method": "none (again, after)", **again})
        plain = max(run["output_tok_per_s"] for run in plain_runs)
        step_costs[batch]["plain_tok_per_s_runs"] = [run["output_tok_per_s"] for run in plain_runs]
        step_costs[batch]["plain_tok_per_s"] = plain
        print(
            f"batch {batch}: no speculation again {again['output_tok_per_s']:.0f} tok/s; "
            f"speed-ups against the fastest, {plain:.0f} tok/s:",
            flush=True,
        )
        for row in rows:
            if row["batch"] == batch and "k" in row:
                row["speedup"] = row["output_tok_per_s"] / plain
                if "bound" in row:
                    row["share_of_bound"] = row["speedup"] / row["bound"]
                print(
                    f"  batch {batch:3} {row['method']:11} k={row['k']!s:4} "
                    f"{'adaptive' if row['adaptive'] else 'fixed':8} x{row['speedup']:.2f}"
                    + (
                        f"  (bound x{row['bound']:.2f}: {row['share_of_bound']:.0%})"
                        if "bound" in row
                        else ""
                    ),
                    flush=True,
                )
        if batch == 1:
            best_k = {
                m: args.adaptive_k.get(m)
                or max(
                    (r for r in rows if r["method"] == m and r["batch"] == 1),
                    key=lambda r: r["speedup"],
                )["k"]
                for m in args.methods
            }
            print(f"k at batches > 1: {best_k}", flush=True)
    return {"split": split, "step_costs": step_costs, "rows": rows}


# -- runner steps ----------------------------------------------------------------------------


def time_runner_step(runner, step: list[SequenceChunk], repeats: int = REPEATS) -> float:
    """Median ms of one runner step (launch, then the host copy's wait: the step's one
    sync), without the scheduler, proposer or the engine's bookkeeping."""
    for _ in range(3):
        runner.execute(step)
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def verify_chunks(
    batch: int, k: int, context: int, tables: list[list[int]], vocab: int, rng: random.Random
) -> list[SequenceChunk]:
    """``batch`` decodes at ``context`` tokens, each verifying k random drafts (k = 0: a
    plain one-token decode)."""
    row = SamplingRow(SamplingParams(temperature=0.0), [0], [1] * 8, ())
    return [
        SequenceChunk(
            f"s{i}",
            [rng.randrange(vocab) for _ in range(k + 1)],
            context,
            tables[i],
            row,
            num_draft_tokens=k,
        )
        for i in range(batch)
    ]


def runner_steps_demo(args: argparse.Namespace) -> dict:
    """The demo model's runner step of k + 1 tokens per request (CUDA graphs) against a
    one-token step, at the W7 batch sizes that fit the verify graphs: what verification
    costs on the device and in the runner, apart from the engine's host work."""
    max_k = max([*args.ks, *args.adaptive_k.values(), 1])
    batches = [b for b in [1, *args.batches] if b <= 64]
    core = make_core(
        str(DEFAULT_MODEL_DIR),
        max(batches),
        {"method": "ngram", "num_speculative_tokens": max_k},
    )
    block = core.kv_manager.block_size
    context = PROMPT_TOKENS + 128
    per_seq = -(-(context + max_k + 2) // block)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(max(batches))]
    rng = random.Random(0)
    vocab = core.model_config.vocab_size
    results: dict = {"context": context, "batches": {}}
    for batch in batches:
        entry = {
            k + 1: time_runner_step(
                core.runner, verify_chunks(batch, k, context, tables, vocab, rng)
            )
            for k in range(max_k + 1)
        }
        results["batches"][batch] = entry
        print(
            f"demo runner step, batch {batch} (tokens/request: ms): "
            + ", ".join(f"{n}: {t:.3f}" for n, t in entry.items()),
            flush=True,
        )
    release(core)
    return results


# -- 8B verify steps ------------------------------------------------------------------------


def verify_steps_8b(args: argparse.Namespace, measured_rates: dict[str, float]) -> dict:
    max_k = 8
    core = make_core_8b(max_k)
    runner = core.runner
    block = core.kv_manager.block_size
    context = 512
    tables = [list(range(i * 40, i * 40 + 40)) for i in range(16)]  # 640 tokens of room each
    rng = random.Random(0)
    vocab = core.model_config.vocab_size

    def time_step(batch: int, k: int, repeats: int = REPEATS) -> float:
        return time_runner_step(
            runner, verify_chunks(batch, k, context, tables, vocab, rng), repeats
        )

    assert block * 40 >= context + max_k + 1
    results: dict = {"context": context, "batches": {}}
    for batch in (1, 16):
        decode = time_step(batch, 0)
        entry = {
            "decode_ms": decode,
            "verify_ms": {},
            "verify_eager_decode_kernel_ms": {},
            "verify_eager_extend_kernel_ms": {},
        }
        for k in range(1, max_k + 1):
            entry["verify_ms"][k + 1] = time_step(batch, k)
        graphs, runner.decode_graphs = runner.decode_graphs, None
        eager_repeats = max(1, REPEATS // 3)
        for k in (1, 3, 5, 8):
            entry["verify_eager_decode_kernel_ms"][k + 1] = time_step(batch, k, eager_repeats)
        flattened = model_runner.SequenceChunk.flattened
        model_runner.SequenceChunk.flattened = property(lambda c: len(c.token_ids) == 1)  # type: ignore[method-assign]
        try:
            for k in (1, 3, 5, 8):
                entry["verify_eager_extend_kernel_ms"][k + 1] = time_step(batch, k, eager_repeats)
        finally:
            model_runner.SequenceChunk.flattened = flattened  # type: ignore[method-assign]
            runner.decode_graphs = graphs
        rates = {"0.6": 0.6, "0.7": 0.7, "0.8": 0.8, **measured_rates}
        entry["implied_speedup"] = {
            name: {
                k + 1: (1 - rate ** (k + 1)) / (1 - rate) * decode / entry["verify_ms"][k + 1]
                for k in range(1, max_k + 1)
            }
            for name, rate in rates.items()
        }
        results["batches"][batch] = entry
        print(
            f"8B batch {batch}: decode {decode:.3f} ms; verify (graphs) "
            + ", ".join(f"{n}: {t:.3f}" for n, t in entry["verify_ms"].items())
        )
        print(
            "  eager, decode kernel: "
            + ", ".join(f"{n}: {t:.3f}" for n, t in entry["verify_eager_decode_kernel_ms"].items())
        )
        print(
            "  eager, extend kernel: "
            + ", ".join(f"{n}: {t:.3f}" for n, t in entry["verify_eager_extend_kernel_ms"].items())
        )
        for name, speedups in entry["implied_speedup"].items():
            best = max(speedups, key=speedups.get)
            print(
                f"  acceptance {name}: best {best} tokens/step -> x{speedups[best]:.2f}; "
                + ", ".join(f"{n}: x{s:.2f}" for n, s in speedups.items())
            )
    release(core)
    return results


def make_core_8b(max_k: int) -> EngineCore:
    gc.collect()
    torch.cuda.empty_cache()
    config = EngineConfig.from_kwargs(
        model=str(SHAPES / "llama3-8b"),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        max_model_len=2048,
        max_num_seqs=16,
        max_num_batched_tokens=2048,
        num_gpu_blocks_override=16 * 40 + 64,
        # Only to build the verifying sampler and the verify graphs: the steps are timed
        # directly through the runner.
        speculative_config={"method": "ngram", "num_speculative_tokens": max_k},
    )
    return EngineCore(config)


def pin_to_core(core: int | None) -> None:
    """Run this process on one core, one torch thread (None: as it is). The GPU machine's
    host ran the same Python at two speeds ~2x apart (benchmarks/host_costs.py
    --probe-cores), so host-bound figures compared across runs need one core."""
    if core is None:
        return
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def time_calls(owner, name: str, totals: dict[str, float], label: str) -> None:  # noqa: ANN001
    """Wrap owner.name so each call adds its wall time to totals[label]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def add_pin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pin-core",
        type=int,
        default=None,
        help="run on this one core (host_costs.py --probe-cores prints the fastest)",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--ks", default="1,2,3,4,5,6")
    parser.add_argument("--batches", default="4,16,64,256")
    parser.add_argument("--methods", default="ngram,draft_model")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each speculating setting per batch size (its fastest is reported), "
        "with a plain run between rounds",
    )
    parser.add_argument(
        "--adaptive-k",
        default="",
        help="method=k,... : run these with the adaptive draft length at batch 1 too, and "
        "at k on larger batches (default: the best fixed k at batch 1)",
    )
    parser.add_argument("--runner-steps", action="store_true")
    parser.add_argument(
        "--skip-serial", action="store_true", help="skip batch 1's not-overlapped plain run"
    )
    parser.add_argument("--skip-w7", action="store_true")
    parser.add_argument("--skip-8b", action="store_true")
    add_pin_argument(parser)
    args = parser.parse_args()
    pin_to_core(args.pin_core)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.methods = [m for m in args.methods.split(",") if m]
    args.adaptive_k = {
        method: int(k)
        for method, k in (item.split("=") for item in args.adaptive_k.split(",") if item)
    }
    if not args.ks and set(args.methods) - set(args.adaptive_k):
        parser.error("with --ks empty, give every method's k in --adaptive-k")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {
        "card": card_name(),
        "commit": args.commit,
        "command": "PYTHONPATH=. python3 benchmarks/spec_decode.py " + " ".join(sys.argv[1:]),
    }
    measured_rates: dict[str, float] = {}
    started = time.perf_counter()
    if not args.skip_w7:
        figures = w7(args)
        for method in args.methods:
            at_one = [r for r in figures["rows"] if r["batch"] == 1 and r["method"] == method]
            if at_one:
                best = max(at_one, key=lambda r: r["speedup"])
                if best.get("acceptance_rate"):
                    measured_rates[f"demo {method} k={best['k']}"] = best["acceptance_rate"]
        save_copies({"workload": "W7 spec", **common, **figures}, RESULTS, f"{stamp}-W7.json")
        print(f"W7 done in {time.perf_counter() - started:.0f} s", flush=True)
    if args.runner_steps:
        figures = runner_steps_demo(args)
        save_copies(
            {"workload": "spec runner steps, demo model", **common, **figures},
            RESULTS,
            f"{stamp}-spec-runner-steps.json",
        )
    if not args.skip_8b:
        figures = verify_steps_8b(args, measured_rates)
        save_copies(
            {"workload": "spec verify steps, llama3-8b shape", **common, **figures},
            RESULTS,
            f"{stamp}-spec-verify-8b.json",
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
