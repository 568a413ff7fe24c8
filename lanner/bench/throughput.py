"""`lanner bench throughput`: every request submitted at once to the offline LLM;
requests/s, output tok/s and total tok/s over the wall time (prefill included)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from lanner.bench import report, roofline
from lanner.bench.datasets import BenchRequest, build_requests


def make_llm(args: argparse.Namespace) -> Any:
    from lanner.entrypoints.cli import engine_kwargs
    from lanner.entrypoints.llm import LLM

    return LLM(**engine_kwargs(args))


def model_shape(llm: Any, args: argparse.Namespace) -> roofline.ModelShape:
    """The served model's shape, its matmul weights counted in the bytes they were loaded
    as (quantized weights and their scales)."""
    core = llm.engine.core
    shape = roofline.ModelShape.from_config(core.model_config, args.dtype)
    return dataclasses.replace(shape, matmul_weight_bytes=core.loaded.matmul_weight_bytes)


def llm_device(llm: Any) -> str:
    try:
        return next(llm.engine.core.loaded.model.parameters()).device.type
    except (AttributeError, StopIteration):
        return "cpu"


def sampling_params(args: argparse.Namespace, output_len: int) -> Any:
    from lanner.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=output_len,
        ignore_eos=True,
        temperature=args.temperature,
        top_p=args.top_p,
        detokenize=args.detokenize,
    )


def spec_counts(llm: Any) -> tuple[int, int, int] | None:
    """(drafts, draft tokens, accepted tokens) so far, or None without speculation."""
    spec = llm.engine.core.spec
    if spec is None:
        return None
    stats = spec.policy.stats
    return stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens


def spec_summary(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> dict:
    """Speculation over a timed run: counts, mean acceptance length (accepted + 1 per
    verify step, vLLM's definition) and the acceptance rate of proposed tokens."""
    if before is None or after is None:
        return {}
    drafts, tokens, accepted = (b - a for a, b in zip(before, after, strict=True))
    return {
        "spec_decode": {
            "num_drafts": drafts,
            "num_draft_tokens": tokens,
            "num_accepted_tokens": accepted,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "acceptance_rate": accepted / tokens if tokens else None,
        }
    }


def format_spec_summary(summary: dict) -> str | None:
    spec = summary.get("spec_decode")
    if not spec or not spec["num_drafts"]:
        return None
    return (
        f"Speculative decoding: mean acceptance length {spec['mean_acceptance_length']:.2f}, "
        f"{spec['num_accepted_tokens']} of {spec['num_draft_tokens']} proposed tokens accepted "
        f"({spec['num_drafts']} verify steps)"
    )


def vocab_for(llm: Any) -> int:
    """Random prompt ids come from the model's vocabulary."""
    return int(llm.engine.core.model_config.vocab_size)


def run_batch(llm: Any, requests: list[BenchRequest], args: argparse.Namespace, tqdm: bool):  # noqa: ANN201
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [sampling_params(args, r.output_len) for r in requests]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=tqdm)
    return outputs, time.perf_counter() - started


def run_throughput(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    requests = build_requests(args, vocab_for(llm), llm.get_tokenizer())
    if args.num_warmups > 0:
        run_batch(llm, requests[: args.num_warmups], args, tqdm=False)
        llm.reset_prefix_cache()
    before = spec_counts(llm)
    outputs, elapsed = run_batch(llm, requests, args, tqdm=not args.disable_tqdm)
    input_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    results = {
        "dataset": args.dataset_name,
        "num_requests": len(outputs),
        "elapsed_s": elapsed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requested_output_tokens": sum(r.output_len for r in requests),
        "requests_per_s": len(outputs) / elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        "total_tok_per_s": (input_tokens + output_tokens) / elapsed,
        **spec_summary(before, spec_counts(llm)),
    }
    shape = model_shape(llm, args)
    batch = llm.engine.config.max_num_seqs
    section = roofline.roofline_section(
        shape,
        lambda s: roofline.workload_floor(
            s, [(r.input_len, r.output_len) for r in requests], batch
        ),
        elapsed,
        llm_device(llm),
    )
    result = report.new_result("throughput", args.model)
    result.update(results=results, roofline=section, config=_config(args))
    print(
        f"Throughput: {results['requests_per_s']:.2f} requests/s, "
        f"{results['total_tok_per_s']:.2f} total tok/s, "
        f"{results['output_tok_per_s']:.2f} output tok/s "
        f"({len(outputs)} requests, {input_tokens} prompt + {output_tokens} output tokens "
        f"in {elapsed:.2f} s)"
    )
    spec_line = format_spec_summary(results)
    if spec_line:
        print(spec_line)
    print(roofline.format_roofline(section))
    if args.plot:
        series = _request_latencies(outputs)
        result["plots"] = []
    path = report.write_json(result, args.output_json, args.result_dir)
    if args.plot:
        figure = report.plot_cdfs(series, report.figure_path(path, "latency-cdf"),
                                  f"throughput: {len(outputs)} requests")  # fmt: skip
        result["plots"].append(str(figure))
        report.write_json(result, path)
    return 0


def _request_latencies(outputs: list[Any]) -> dict[str, list[float]]:
    """Per-request TTFT, TPOT and E2E latency in ms from the engine's request metrics."""
    series: dict[str, list[float]] = {"TTFT": [], "TPOT": [], "E2E": []}
    for output in outputs:
        metrics = output.metrics
        if metrics.time_to_first_token is not None:
            series["TTFT"].append(metrics.time_to_first_token * 1e3)
        if metrics.time_per_output_token is not None:
            series["TPOT"].append(metrics.time_per_output_token * 1e3)
        if metrics.finished_time is not None:
            series["E2E"].append((metrics.finished_time - metrics.arrival_time) * 1e3)
    return series


def _config(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"handler", "bench_command", "command"}
    return {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-json", default=None, help="result file (default: a "
                        "stamped file in --result-dir)")  # fmt: skip
    parser.add_argument("--result-dir", default=None, help="folder for result files (default: "
                        "benchmarks/results/ when run from a lanner checkout, else the current "
                        "directory)")  # fmt: skip
    parser.add_argument("--plot", action="store_true", help="also write PNG figures")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def add_warmup_arg(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--num-warmups", type=int, default=default, help="untimed runs first")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument(
        "--detokenize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="detokenize outputs (default: off, as the figures need token ids only)",
    )
