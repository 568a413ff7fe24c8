"""The peer beside `lanner bench`: the same random workloads through HF transformers
`generate` on the same card, writing JSON in the same format (workload, model, card,
commit, command, results), so a result table carries a peer measured in the same call.

  throughput: the `lanner bench throughput` random request set (same seed, same lengths,
      same token ids), in padded batches of --max-batch; each batch generates its longest
      output, and only the tokens each request asked for count.
  latency: batch --batch-size (default 1), TPOT from two timings: generating output-len
      tokens and generating 1 (the prefill), median over --num-iters.

Model: a folder with config.json (e.g. benchmarks/shapes/qwen3-0.6b) built with random
weights (AutoModelForCausalLM.from_config, bf16, cuda), or a checkpoint with --load.
    PYTHONPATH=. python benchmarks/peers/hf_transformers.py throughput \\
        --model benchmarks/shapes/qwen3-0.6b --num-prompts 256 \\
        --input-len-range 100:1024 --output-len-range 100:1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lanner.bench import report  # noqa: E402
from lanner.bench.datasets import parse_range, random_requests  # noqa: E402


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    dtype = getattr(torch, args.dtype)
    if args.load:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model.to(args.device).eval()
    config = transformers.AutoConfig.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=args.attn_implementation
        )
    return model.eval()


def _generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, args) -> int:  # noqa: ANN001
    """Left-pad `prompts` into one batch and generate exactly `new_tokens` for each;
    returns the number of tokens generated per row."""
    longest = max(len(p) for p in prompts)
    pad = 0
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    if args.temperature <= 0:
        sampling = {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(args.device),
            attention_mask=mask.to(args.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            eos_token_id=None,
            **sampling,
        )
    return out.shape[1] - longest


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_throughput(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    requests = random_requests(
        args.num_prompts,
        args.input_len,
        args.output_len,
        model.config.vocab_size,
        args.seed,
        parse_range(args.input_len_range),
        parse_range(args.output_len_range),
    )
    batches = [requests[i : i + args.max_batch] for i in range(0, len(requests), args.max_batch)]
    _generate(model, [requests[0].prompt_token_ids], 2, args)  # warm-up
    _sync(args.device)
    started = time.perf_counter()
    generated = 0
    for batch in batches:
        rows = _generate(
            model, [r.prompt_token_ids for r in batch], max(r.output_len for r in batch), args
        )
        generated += rows * len(batch)
    _sync(args.device)
    elapsed = time.perf_counter() - started
    input_tokens = sum(r.input_len for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    return {
        "dataset": "random",
        "num_requests": len(requests),
        "max_batch": args.max_batch,
        "elapsed_s": elapsed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "generated_tokens_with_padding": generated,
        "requests_per_s": len(requests) / elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        "total_tok_per_s": (input_tokens + output_tokens) / elapsed,
    }


def run_latency(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    [request] = random_requests(
        1, args.input_len, args.output_len, model.config.vocab_size, args.seed
    )
    prompts = [request.prompt_token_ids] * args.batch_size

    def timed(new_tokens: int) -> float:
        _sync(args.device)
        started = time.perf_counter()
        _generate(model, prompts, new_tokens, args)
        _sync(args.device)
        return time.perf_counter() - started

    for _ in range(args.num_iters_warmup):
        timed(1)
        timed(args.output_len)
    ttft, total, tpot = [], [], []
    for _ in range(args.num_iters):
        first = timed(1)
        whole = timed(args.output_len)
        ttft.append(first * 1e3)
        total.append(whole * 1e3)
        tpot.append((whole - first) / max(1, args.output_len - 1) * 1e3)
    return {
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "ttft_ms": report.summarize(ttft),
        "tpot_ms": report.summarize(tpot),
        "batch_latency_ms": report.summarize(total),
        "tokens_per_s_per_request": 1e3 / statistics.median(tpot),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=("throughput", "latency"))
    parser.add_argument("--model", required=True, help="folder with config.json")
    parser.add_argument("--load", action="store_true", help="load the checkpoint's weights")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--input-len-range", default=None)
    parser.add_argument("--output-len-range", default=None)
    parser.add_argument("--max-batch", type=int, default=64, help="throughput: rows per generate")
    parser.add_argument("--batch-size", type=int, default=1, help="latency: rows")
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    model = load_model(args)
    run = run_throughput if args.workload == "throughput" else run_latency
    results = run(model, args)
    result = report.new_result(args.workload, args.model)
    result.update(engine="hf-transformers", results=results, config=vars(args))
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key}: {value}")
    for key in ("ttft_ms", "tpot_ms", "batch_latency_ms"):
        if key in results:
            print(f"{key}: median {results[key]['median']:.2f} p99 {results[key]['p99']:.2f}")
    target = args.output_json or report.default_json_path(f"{args.workload}-hf")
    report.write_json(result, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
