"""`lanner bench serve`: an async client for any OpenAI-compatible server. Streamed
/v1/completions requests (token-id prompts, ignore_eos, max_tokens) arrive as a seeded
Poisson process at --request-rate (or all at once for inf), at most --max-concurrency in
flight; TTFT, TPOT, ITL and E2E latency per request, and goodput under SLOs.

The requests go out through aiohttp: httpx's connection pool walks every connection on
each request, which at 200 concurrent streams added hundreds of milliseconds of the
client's own to every TTFT."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lanner.bench import report, roofline
from lanner.bench.datasets import BenchRequest, build_requests

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
WARMUP_SEED_OFFSET = 1_000_003


@dataclass
class RequestResult:
    input_len: int
    output_len: int  # wanted
    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput takes NAME:MS with NAME in {GOODPUT_METRICS}, got {item!r}"
            )
        slos[name] = float(value)
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be positive")
    return slos


def parse_rates(args: argparse.Namespace) -> list[float]:
    text = args.request_rates if args.request_rates else str(args.request_rate)
    return [float(part) for part in text.split(",") if part.strip()]


async def _one_request(
    client: Any,
    url: str,
    model: str,
    request: BenchRequest,
    args: argparse.Namespace,
    headers: dict[str, str],
) -> RequestResult:
    result = RequestResult(request.input_len, request.output_len)
    if url.endswith("/chat/completions"):
        # Chat takes text: the prompt's ids decoded (run_serve_bench does it), as one turn.
        prompt: dict[str, Any] = {"messages": [{"role": "user", "content": request.prompt}]}
    else:
        prompt = {"prompt": request.prompt_token_ids}
    body = {
        "model": model,
        **prompt,
        "max_tokens": request.output_len,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    started = time.perf_counter()
    last = started
    counted = 0
    usage_tokens = None
    try:
        async with client.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                result.error = f"HTTP {response.status}: {text[:300]}"
                return result
            async for raw in response.content:  # one line at a time
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if counted == 0:
                    result.ttft = now - started
                else:
                    result.itl.append(now - last)
                last = now
                counted += 1
    except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency = time.perf_counter() - started
    result.output_tokens = usage_tokens if usage_tokens is not None else counted
    result.success = counted > 0
    if not result.success:
        result.error = "no tokens streamed"
    return result


async def _arrivals(requests: list[BenchRequest], rate: float, rng: random.Random):  # noqa: ANN202
    """Yield the requests on a Poisson process of `rate` per second (inf: all at once)."""
    for index, request in enumerate(requests):
        yield request
        if math.isinf(rate) or index == len(requests) - 1:
            continue
        await asyncio.sleep(rng.expovariate(rate))


async def run_rate(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    rate: float,
    args: argparse.Namespace,
) -> tuple[list[RequestResult], float]:
    import aiohttp

    url = base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency
    semaphore = asyncio.Semaphore(limit) if limit else None
    bar = tqdm(total=len(requests), desc=f"rate {rate:g}", unit="req", disable=args.disable_tqdm)
    connector = aiohttp.TCPConnector(limit=limit or 0)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=30.0)

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=1 << 20
    ) as client:

        async def guarded(request: BenchRequest) -> RequestResult:
            if semaphore is None:
                outcome = await _one_request(client, url, model, request, args, headers)
            else:
                async with semaphore:
                    outcome = await _one_request(client, url, model, request, args, headers)
            bar.update(1)
            return outcome

        rng = random.Random(args.seed)
        started = time.perf_counter()
        tasks = []
        async for request in _arrivals(requests, rate, rng):
            tasks.append(asyncio.create_task(guarded(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    bar.close()
    return list(results), duration


def summarize_run(
    results: list[RequestResult], duration: float, rate: float, slos: dict[str, float]
) -> dict[str, Any]:
    """vLLM's serving summary of one run (times in ms)."""
    good = [r for r in results if r.success]
    input_tokens = sum(r.input_len for r in good)
    output_tokens = sum(r.output_tokens for r in good)
    series = {
        "ttft": [r.ttft * 1e3 for r in good],
        "tpot": [r.tpot * 1e3 for r in good if r.tpot is not None],
        "itl": [gap * 1e3 for r in good for gap in r.itl],
        "e2el": [r.latency * 1e3 for r in good],
    }
    summary: dict[str, Any] = {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(good),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requested_output_tokens": sum(r.output_len for r in results),
        "request_throughput": len(good) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name, values in series.items():
        stats = report.summarize(values)
        summary[f"mean_{name}_ms"] = stats["mean"]
        summary[f"median_{name}_ms"] = stats["median"]
        summary[f"std_{name}_ms"] = stats["std"]
        for q in report.PERCENTILES:
            summary[f"p{q}_{name}_ms"] = stats[f"p{q}"]
    if slos:
        meeting = sum(1 for r in good if _meets(r, slos))
        summary["goodput_slos_ms"] = slos
        summary["goodput_requests"] = meeting
        summary["goodput_share"] = meeting / len(results) if results else 0.0
        summary["request_goodput"] = meeting / duration
    summary["_series"] = {"TTFT": series["ttft"], "TPOT": series["tpot"], "E2E": series["e2el"]}
    return summary


def _meets(result: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.latency}
    return all(values[name] * 1e3 <= limit for name, limit in slos.items())


def print_summary(summary: dict[str, Any]) -> None:
    line = "=" * 50
    print(f"{' Serving Benchmark Result ':=^50}")
    rows = [
        ("Request rate (req/s)", summary["request_rate"]),
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", summary["duration_s"]),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", summary["request_throughput"]),
        ("Output token throughput (tok/s)", summary["output_throughput"]),
        ("Total token throughput (tok/s)", summary["total_token_throughput"]),
    ]
    if "goodput_share" in summary:
        rows.append(("Request goodput (req/s)", summary["request_goodput"]))
        rows.append(("Share meeting all SLOs", summary["goodput_share"]))
    for label, value in rows:
        print(f"{label:<40}{value:<10.2f}" if isinstance(value, float) else f"{label:<40}{value}")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
    for name, title in titles.items():
        print(f"{f' {title} ':-^50}")
        for stat in ("mean", "median", "p99"):
            print(f"{f'{stat.capitalize()} {name.upper()} (ms)':<40}"
                  f"{summary[f'{stat}_{name}_ms']:<10.2f}")  # fmt: skip
    print(line)


def _model_name(base_url: str, model: str | None, api_key: str | None) -> str:
    if model:
        return model
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    listing = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
    return listing["data"][0]["id"]


def _tokenizer(args: argparse.Namespace) -> Any:
    if not args.tokenizer:
        return None
    from lanner.model.tokenizer import load_tokenizer

    return load_tokenizer(args.tokenizer, trust_remote_code=False)


def _as_text(requests: list[BenchRequest], tokenizer: Any) -> list[BenchRequest]:
    if tokenizer is None:
        raise ValueError("a chat endpoint takes text: pass --tokenizer to decode the prompts")
    return [
        replace(request, prompt=tokenizer.decode(request.prompt_token_ids)) for request in requests
    ]


def _shape(args: argparse.Namespace) -> roofline.ModelShape | None:
    folder = args.model_config or args.tokenizer
    if folder and (Path(folder) / "config.json").exists():
        return roofline.ModelShape.from_model_dir(folder)
    return None


def check_reachable(base_url: str, timeout_s: float = 10.0) -> None:
    """Fail with one line (ValueError) when nothing answers at ``base_url``: otherwise every
    request would fail on its own, after the run was set up."""
    import urllib.error
    import urllib.request

    url = base_url.rstrip("/") + "/v1/models"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()  # noqa: S310 - the user's URL
    except urllib.error.HTTPError:
        return  # something answered (401 without --api-key, 404 elsewhere): a server
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"no server answers at {base_url} ({reason}); start one (e.g. `lanner serve`) "
            f"or point --base-url at it"
        ) from None


def run_serve_bench(args: argparse.Namespace) -> int:
    slos = parse_goodput(args.goodput)
    rates = parse_rates(args)
    check_reachable(args.base_url)
    model = _model_name(args.base_url, args.model, args.api_key)
    tokenizer = _tokenizer(args)
    vocab = args.vocab_size or (len(tokenizer) if tokenizer is not None else 1000)
    shape = _shape(args)
    runs: list[dict[str, Any]] = []
    series_by_rate: list[dict[str, list[float]]] = []
    for index, rate in enumerate(rates):
        # Each rate (and each warm-up) gets prompts of its own seed, so no run is served
        # from the prefix cache an earlier one filled.
        if args.num_warmups > 0:
            warmup = _requests(args, vocab, tokenizer, WARMUP_SEED_OFFSET + index,
                               num_prompts=args.num_warmups)  # fmt: skip
            asyncio.run(run_rate(args.base_url, model, warmup, math.inf, _quiet(args)))
        requests = _requests(args, vocab, tokenizer, index)
        if args.endpoint.endswith("/chat/completions"):
            requests = _as_text(requests, tokenizer)
        results, duration = asyncio.run(run_rate(args.base_url, model, requests, rate, args))
        summary = summarize_run(results, duration, rate, slos)
        series_by_rate.append(summary.pop("_series"))
        # Served elsewhere, the roofline needs the card here to be the server's.
        summary["roofline"] = roofline.roofline_section(
            shape,
            lambda s, res=results: roofline.workload_floor(
                s, [(r.input_len, r.output_tokens) for r in res if r.success],
                args.max_concurrency or len(res),
            ),
            duration,
        )  # fmt: skip
        print_summary(summary)
        print(roofline.format_roofline(summary["roofline"]))
        runs.append(summary)
    result = report.new_result("serve", model)
    result.update(base_url=args.base_url, results={"runs": runs}, config=_config(args))
    path = report.write_json(result, args.output_json, args.result_dir)
    if args.plot:
        plots = []
        for run, series in zip(runs, series_by_rate, strict=True):
            rate = run["request_rate"]
            plots.append(str(report.plot_cdfs(series, report.figure_path(path, f"cdf-rate{rate}"),
                                              f"serve: {model} at {rate} req/s")))  # fmt: skip
        if len(runs) > 1:
            sweep = [dict(run, request_rate=float(run["request_rate"])) for run in runs]
            plots.append(str(report.plot_sweep(sweep, report.figure_path(path, "sweep"),
                                               f"serve: {model}")))  # fmt: skip
        result["plots"] = plots
        report.write_json(result, path)
    return 0 if all(run["completed"] > 0 for run in runs) else 1


def _requests(
    args: argparse.Namespace, vocab: int, tokenizer: Any, seed_offset: int, **changes: Any
) -> list[BenchRequest]:
    shifted = argparse.Namespace(**{**vars(args), "seed": args.seed + seed_offset, **changes})
    return build_requests(shifted, vocab, tokenizer)


def _quiet(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "disable_tqdm": True})


def _config(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"handler", "bench_command", "command", "api_key"}
    return {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--endpoint", default="/v1/completions",
                        help="/v1/completions or /v1/chat/completions")  # fmt: skip
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token (default: none)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder, for ShareGPT "
                        "prompts and the chat endpoint (default: none)")  # fmt: skip
    parser.add_argument(
        "--model-config",
        default=None,
        help="folder with the served model's config.json, for the roofline (default: none)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="random prompt ids below this (default: the tokenizer's, else 1000)",
    )
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrivals per second (inf: all at once)")  # fmt: skip
    parser.add_argument("--request-rates", default=None, help="a sweep, e.g. 4,16,32 "
                        "(default: --request-rate alone)")  # fmt: skip
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight (default: no limit)")  # fmt: skip
    parser.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                        help="SLOs, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el; "
                        "default: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    parser.add_argument("--request-timeout", type=float, default=6 * 3600.0,
                        help="seconds one request may take")  # fmt: skip
    parser.add_argument("--num-warmups", type=int, default=0, help="untimed requests per rate")
