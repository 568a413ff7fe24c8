"""vLLM's serving benchmark client and `lanner bench serve` on one chat workload against
one `lanner serve`, with the server's own TTFT (from /metrics) beside
each run: do the two clients measure the same time to first token?

vLLM's client is not vendored: pass the folder holding its `benchmark_serving.py` and
`backend_request_func.py` (vLLM's `benchmarks/`; checked with commit 0118413). It needs
aiohttp, datasets and pillow in this interpreter. From the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vllm_client_ttft.py /tmp/vllm_bench \\
        --rounds 3 --rates 1,inf

starts `lanner serve` on the demo model (float32, --max-model-len 1024, prefix caching
off, OMP_NUM_THREADS=1), runs each of `--rates` through one client, then the other (the
order flips every round), then each of `--side-by-side-rates` through both at once (each
at that rate), so that both see the same load on a shared machine; `--rounds` times. One
JSON file goes to benchmarks/results/ (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from lanner.bench.report import card_name, command_line, git_commit, save_copies

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "lanner" / "assets" / "demo-model"
VLLM_FILES = ("benchmark_serving.py", "backend_request_func.py")
METRIC_LINE = re.compile(r"^(lanner:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")
# Counters read before and after each run: their difference is what the run cost the server.
COUNTERS = {
    "ttft_sum_s": "lanner:time_to_first_token_seconds_sum",
    "ttft_count": "lanner:time_to_first_token_seconds_count",
    "prompt_tokens": "lanner:prompt_tokens_total",
    "generation_tokens": "lanner:generation_tokens_total",
}


def scrape(base_url: str) -> dict[str, float]:
    """The server's counters, plus finished requests per finish reason."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=30).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        for key, metric in COUNTERS.items():
            if name == metric:
                values[key] = values.get(key, 0.0) + value
        reason = re.search(r'finished_reason="([a-z]+)"', labels)
        if name == "lanner:request_success_total" and reason:
            values[f"finished_{reason.group(1)}"] = value
    return values


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    requests = delta.get("ttft_count", 0.0)
    return {
        # Includes each client's one untimed warm-up request.
        "requests": int(requests),
        "mean_ttft_ms": delta["ttft_sum_s"] / requests * 1e3 if requests else None,
        "prompt_tokens_per_request": delta["prompt_tokens"] / requests if requests else None,
        "generation_tokens_per_request": (
            delta["generation_tokens"] / requests if requests else None
        ),
        "finish_reasons": {
            key.removeprefix("finished_"): int(value)
            for key, value in delta.items()
            if key.startswith("finished_") and value
        },
    }


def start_server(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lanner.entrypoints.cli", "serve", str(args.model),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
               "--no-enable-prefix-caching", "--port", str(args.port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    log = open(args.server_log, "wb")  # noqa: SIM115 - the server writes it while it runs
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"lanner serve exited with {server.returncode}: see {args.server_log}"
            )
        try:
            urllib.request.urlopen(args.base_url + "/health", timeout=5)
            return server
        except OSError:
            time.sleep(2)
    server.terminate()
    raise RuntimeError(f"lanner serve did not answer /health in 600 s: see {args.server_log}")


def served_model(base_url: str) -> str:
    listing = json.loads(urllib.request.urlopen(base_url + "/v1/models", timeout=30).read())
    return listing["data"][0]["id"]


def vllm_command(
    args: argparse.Namespace, model: str, rate: str, seed: int, out: Path
) -> list[str]:
    return [sys.executable, str(args.vllm_dir / "benchmark_serving.py"),
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", args.base_url, "--model", model, "--tokenizer", str(args.model),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0",
            "--num-prompts", str(args.num_prompts), "--request-rate", rate,
            "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl",
            "--save-result", "--result-dir", str(out.parent),
            "--result-filename", out.name]  # fmt: skip


def lanner_command(
    args: argparse.Namespace, model: str, rate: str, seed: int, out: Path
) -> list[str]:
    # One warm-up request, as vLLM's client sends its "initial test run" before timing.
    return [sys.executable, "-m", "lanner.entrypoints.cli", "bench", "serve",
            "--base-url", args.base_url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(args.model), "--dataset-name", "random",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--request-rate", rate,
            "--seed", str(seed), "--temperature", "0", "--num-warmups", "1",
            "--disable-tqdm", "--output-json", str(out)]  # fmt: skip


def client_numbers(client: str, out: Path) -> dict[str, Any]:
    """TTFT and TPOT (ms) as the client itself reported them."""
    data = json.loads(out.read_text())
    [run] = data["results"]["runs"] if client == "lanner" else [data]
    # Not E2E: at this commit vLLM's client reports its mean E2E as the median and back.
    keys = ("completed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
            "median_tpot_ms", "total_output_tokens")  # fmt: skip
    numbers = {key: run.get(key) for key in keys}
    numbers["duration_s"] = run.get("duration_s", run.get("duration"))
    return numbers


def run_clients(
    args: argparse.Namespace,
    clients: tuple[str, ...],
    model: str,
    rate: str,
    seed: int,
    scratch: Path,
) -> list[dict[str, Any]]:
    """Run `clients` at once (one: an alternating run; two: side by side, each at `rate`)
    and read what each reported; the server's counters cover all of them together."""
    mode = "alternating" if len(clients) == 1 else "side_by_side"
    outs = {client: scratch / f"{mode}-{client}-rate{rate}-seed{seed}.json" for client in clients}
    commands = {
        client: (vllm_command if client == "vllm" else lanner_command)(
            args, model, rate, seed, outs[client]
        )
        for client in clients
    }
    before = scrape(args.base_url)
    started = time.perf_counter()
    running = {
        client: subprocess.Popen(
            command,
            cwd=args.vllm_dir if client == "vllm" else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for client, command in commands.items()
    }
    logs = {client: process.communicate()[0] for client, process in running.items()}
    wall = time.perf_counter() - started
    server = server_delta(before, scrape(args.base_url))
    records = []
    for client, process in running.items():
        if process.returncode != 0:
            raise RuntimeError(
                f"{client} client failed ({process.returncode}):\n{logs[client][-4000:]}"
            )
        record = {"mode": mode, "client": client, "request_rate": rate, "seed": seed,
                  "wall_s": wall, **client_numbers(client, outs[client]), "server": server,
                  "command": " ".join(commands[client])}  # fmt: skip
        print(f"{mode:>12} {client:>6} rate {rate:>4} seed {seed}: TTFT mean "
              f"{record['mean_ttft_ms']:8.1f} median {record['median_ttft_ms']:8.1f} ms | "
              f"server mean {server['mean_ttft_ms']:8.1f} ms over {server['requests']} | "
              f"{server['finish_reasons']}", flush=True)  # fmt: skip
        records.append(record)
    return records


def compare(runs: list[dict[str, Any]], mode: str, rate: str) -> dict[str, Any]:
    """Per client: the mean over runs of each run's mean and median TTFT, each run's value
    (the spread), and the ratio lanner / vLLM (pooled, per round, and load-normalized)."""
    picked = [run for run in runs if run["mode"] == mode and run["request_rate"] == rate]
    summary: dict[str, Any] = {"mode": mode, "request_rate": rate}
    for client in ("vllm", "lanner"):
        mine = [run for run in picked if run["client"] == client]
        for stat in ("mean", "median"):
            values = [run[f"{stat}_ttft_ms"] for run in mine]
            summary[f"{client}_{stat}_ttft_ms"] = statistics.fmean(values)
            summary[f"{client}_{stat}_ttft_ms_runs"] = values
        server = [run["server"]["mean_ttft_ms"] for run in mine]
        summary[f"{client}_server_mean_ttft_ms_runs"] = server
        # The client's mean over the server's own mean for the same requests: what the
        # client adds, free of how busy the shared machine was during that run.
        summary[f"{client}_over_server_mean_ttft"] = statistics.fmean(
            run["mean_ttft_ms"] / mean for run, mean in zip(mine, server, strict=True)
        )
    summary["load_normalized_mean_ttft_ratio_lanner_over_vllm"] = (
        summary["lanner_over_server_mean_ttft"] / summary["vllm_over_server_mean_ttft"]
    )
    for stat in ("mean", "median"):
        ratio = summary[f"lanner_{stat}_ttft_ms"] / summary[f"vllm_{stat}_ttft_ms"]
        summary[f"{stat}_ttft_ratio_lanner_over_vllm"] = ratio
        by_round: dict[int, dict[str, float]] = {}
        for run in picked:
            by_round.setdefault(run["seed"], {})[run["client"]] = run[f"{stat}_ttft_ms"]
        summary[f"{stat}_ttft_ratio_per_round"] = [
            pair["lanner"] / pair["vllm"] for pair in by_round.values() if len(pair) == 2
        ]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vllm_dir", type=Path, help="folder with vLLM's benchmark_serving.py")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--base-url", default=None, help="use this running server instead")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rates", default="1,inf", help="request rates, comma-separated")
    parser.add_argument(
        "--side-by-side-rates",
        default="0.5",
        help="rates at which both clients also run at once, each at this rate (the server sees"
        " twice it), so both see the same load; empty: none",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--machine", default=None, help="what ran it, for the JSON")
    parser.add_argument("--commit", default=None, help="default: this checkout's HEAD")
    parser.add_argument("--server-log", default=None, help="default: a temporary file")
    args = parser.parse_args()
    args.vllm_dir = args.vllm_dir.resolve()
    missing = [name for name in VLLM_FILES if not (args.vllm_dir / name).exists()]
    if missing:
        parser.error(f"{args.vllm_dir} lacks {', '.join(missing)} (vLLM's benchmarks/ folder)")
    rates = [part.strip() for part in args.rates.split(",") if part.strip()]
    side_rates = [part.strip() for part in args.side_by_side_rates.split(",") if part.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="vllm-client-ttft-"))
    args.server_log = args.server_log or str(scratch / "server.log")
    server = None
    if args.base_url is None:
        args.base_url = f"http://127.0.0.1:{args.port}"
        server = start_server(args)
    try:
        model = served_model(args.base_url)
        runs: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            # Flip the order every round, so neither client always runs on a warmer server.
            order = ("vllm", "lanner") if round_index % 2 == 0 else ("lanner", "vllm")
            for rate in rates:
                for client in order:
                    runs += run_clients(args, (client,), model, rate, round_index, scratch)
            for rate in side_rates:
                runs += run_clients(args, order, model, rate, round_index, scratch)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    comparisons = [compare(runs, "alternating", rate) for rate in rates]
    comparisons += [compare(runs, "side_by_side", rate) for rate in side_rates]
    for row in comparisons:
        print(f"{row['mode']} rate {row['request_rate']}: TTFT mean vLLM "
              f"{row['vllm_mean_ttft_ms']:.1f} / lanner {row['lanner_mean_ttft_ms']:.1f} ms "
              f"(x{row['mean_ttft_ratio_lanner_over_vllm']:.3f}), median vLLM "
              f"{row['vllm_median_ttft_ms']:.1f} / lanner {row['lanner_median_ttft_ms']:.1f} ms "
              f"(x{row['median_ttft_ratio_lanner_over_vllm']:.3f}); over the server's own "
              f"mean x{row['load_normalized_mean_ttft_ratio_lanner_over_vllm']:.3f}")  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    result = {
        "workload": "vllm-client-ttft",
        "machine": args.machine or card_name(),
        "commit": args.commit or git_commit(),
        "command": command_line(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm_client": "vLLM benchmarks/benchmark_serving.py (openai-chat backend), from "
        + str(args.vllm_dir),
        "workload_shape": {
            "endpoint": "/v1/chat/completions",
            "dataset": "random",
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "rates": rates,
            "side_by_side_rates": side_rates,
            "rounds": args.rounds,
            "model": str(args.model),
            "dtype": args.dtype,
            "max_model_len": args.max_model_len,
            "prefix_caching": False,
            "server_omp_threads": args.server_threads,
        },
        "comparisons": comparisons,
        "runs": runs,
    }
    save_copies(result, RESULTS, f"{stamp}-vllm-client-ttft.json")
    print(f"wrote {RESULTS / f'{stamp}-vllm-client-ttft.json'}")


if __name__ == "__main__":
    main()
