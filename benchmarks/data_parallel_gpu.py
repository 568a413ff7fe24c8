"""`lanner serve --data-parallel-size N` on a machine with N >= 2 GPUs: each engine core on
its own GPU, greedy outputs equal to a one-core server's, every core used, and a shared
prefix kept on one core (cache_aware) against spread over all (round_robin): the W9
workload through each, prefix-cache hit rate and TTFT from the servers' own counters.

Run on the GPU machine from the repository root (about 3-6 minutes):
    PYTHONPATH=. python3 benchmarks/data_parallel_gpu.py --commit "$(git rev-parse --short HEAD)"
Writes benchmarks/results/<stamp>-data-parallel-gpu.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from benchmarks.route_fleet import CLI, Process, result_header
from lanner.bench.report import save_copies
from lanner.bench.server_metrics import metric_total, scrape_metrics
from lanner.engine.config import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "lanner-demo"


def complete(url: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def per_engine(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name, value in scrape_metrics(url).items():
        if name.startswith("lanner:data_parallel_requests_total{"):
            engine = name.split("engine=", 1)[1].split(",", 1)[0]
            counts[engine] = counts.get(engine, 0.0) + value
    return counts


def w9(url: str, logs: Path, tag: str) -> dict:
    before = scrape_metrics(url)
    out = logs / f"w9-{tag}.json"
    subprocess.run(
        [*CLI, "bench", "serve", "--base-url", url, "--model", MODEL, "--dataset-name",
         "tenants", "--num-prompts", "512", "--input-len", "32", "--output-len", "32",
         "--request-rate", "inf", "--max-concurrency", "64", "--vocab-size", "8192",
         "--temperature", "0", "--disable-tqdm", "--output-json", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    after = scrape_metrics(url)
    run = json.loads(out.read_text())["results"]["runs"][0]

    def delta(prefix: str) -> float:
        return metric_total(after, prefix) - metric_total(before, prefix)

    hits = delta("lanner:prefix_cache_hits_total")
    queried = delta("lanner:prefix_cache_queries_total")
    return {
        "prefix_cache_hit_rate": hits / queried if queried else None,
        "per_engine": per_engine(url),
        **{k: run[k] for k in ("completed", "failed", "request_throughput", "mean_ttft_ms",
                               "p99_ttft_ms", "median_tpot_ms")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--data-parallel-size", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    size = args.data_parallel_size
    if size < 2:
        raise SystemExit(f"needs at least 2 GPUs, this machine shows {torch.cuda.device_count()}")
    logs = Path(tempfile.mkdtemp(prefix="lanner-dp-"))
    started = time.time()
    # Small KV caches (2,048 blocks of 16 tokens a core), so where a tenant goes matters.
    engine = [str(DEFAULT_MODEL_DIR), "--num-gpu-blocks-override", "2048", "--max-model-len",
              "1024"]  # fmt: skip
    prompts = [f"def task_{i}(items):\n    # step {i}\n" for i in range(64)]
    result_runs: dict = {}
    # One server at a time: each would otherwise take its memory share of GPU 0 too.
    single = Process(["serve", *engine], logs / "single.log")
    try:
        single.wait_ready(900)
        with ThreadPoolExecutor(16) as pool:
            expected = list(pool.map(lambda p: complete(single.url, p), prompts))
        result_runs["one_core"] = {"w9": w9(single.url, logs, "single")}
    finally:
        single.stop()
    for policy in ("cache_aware", "round_robin"):
        server = Process(["serve", *engine, "--data-parallel-size", str(size),
                          "--data-parallel-policy", policy], logs / f"dp-{policy}.log")  # fmt: skip
        try:
            server.wait_ready(900)
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(lambda p, s=server: complete(s.url, p), prompts))
            result_runs[policy] = {
                "greedy_equal_to_one_core": got == expected,
                "engines_used": per_engine(server.url),
                "w9": w9(server.url, logs, policy),
            }
        finally:
            server.stop()
    result = result_header("data-parallel-gpu", args.commit, started,
                        card=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                        data_parallel_size=size, runs=result_runs)  # fmt: skip
    name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}-data-parallel-gpu.json"
    save_copies(result, RESULTS, name)
    print(json.dumps(result_runs, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
