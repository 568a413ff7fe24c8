"""`lanner bench latency`: one batch of a given size, run K times after warm-up runs;
TTFT and TPOT percentiles over every request of every timed run, and the batch's
end-to-end latency per run."""

from __future__ import annotations

import argparse

from tqdm.auto import tqdm

from lanner.bench import report, roofline
from lanner.bench.datasets import random_requests
from lanner.bench.throughput import (
    _config,
    _request_latencies,
    format_spec_summary,
    llm_device,
    make_llm,
    model_shape,
    run_batch,
    spec_counts,
    spec_summary,
    vocab_for,
)


def run_latency(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    seed = args.seed if args.seed is not None else 0
    requests = random_requests(
        args.batch_size, args.input_len, args.output_len, vocab_for(llm), seed
    )
    for _ in tqdm(range(args.num_iters_warmup), desc="warm-up", disable=args.disable_tqdm):
        run_batch(llm, requests, args, tqdm=False)
    series: dict[str, list[float]] = {"TTFT": [], "TPOT": [], "E2E": []}
    batch_ms: list[float] = []
    output_tokens: list[int] = []
    before = spec_counts(llm)
    for _ in tqdm(range(args.num_iters), desc="timed runs", disable=args.disable_tqdm):
        # Every run starts cold: no prompt is served from the previous run's cache.
        llm.reset_prefix_cache()
        outputs, elapsed = run_batch(llm, requests, args, tqdm=False)
        batch_ms.append(elapsed * 1e3)
        output_tokens.append(sum(len(c.token_ids) for o in outputs for c in o.outputs))
        for name, values in _request_latencies(outputs).items():
            series[name].extend(values)
    results = {
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "output_tokens_per_iter": output_tokens,
        "ttft_ms": report.summarize(series["TTFT"]),
        "tpot_ms": report.summarize(series["TPOT"]),
        "e2e_request_ms": report.summarize(series["E2E"]),
        "batch_latency_ms": report.summarize(batch_ms),
        "batch_latencies_ms": batch_ms,
        **spec_summary(before, spec_counts(llm)),
    }
    median_s = results["batch_latency_ms"]["median"] / 1e3
    section = roofline.roofline_section(
        model_shape(llm, args),
        lambda s: roofline.workload_floor(
            s, [(r.input_len, r.output_len) for r in requests], args.batch_size
        ),
        median_s,
        llm_device(llm),
    )
    result = report.new_result("latency", args.model)
    result.update(results=results, roofline=section, config=_config(args))
    print(f"Batch {args.batch_size}, {args.input_len} in / {args.output_len} out, "
          f"{args.num_iters} runs:")  # fmt: skip
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("batch", "batch_latency_ms")):
        stats = results[key]
        print(
            f"  {name:<5} ms: mean {stats['mean']:.2f}  p50 {stats['p50']:.2f}  "
            f"p90 {stats['p90']:.2f}  p99 {stats['p99']:.2f}"
        )
    spec_line = format_spec_summary(results)
    if spec_line:
        print(spec_line)
    print(roofline.format_roofline(section))
    path = report.write_json(result, args.output_json, args.result_dir)
    if args.plot:
        figure = report.plot_cdfs(
            series, report.figure_path(path, "latency-cdf"), f"latency: batch {args.batch_size}"
        )
        result["plots"] = [str(figure)]
        report.write_json(result, path)
    return 0
