"""Workload W9 (../shared/BENCHMARKS.md) on the CPU: three `lanner serve` replicas of the
demo model behind `lanner router`; 16 tenants, each with its own 400-token system
prompt; 512 requests (tenant uniform at random, a 32-token user turn, 32 output tokens)
arriving as a Poisson process, sent by `lanner bench serve`. Per policy: the aggregate
prefix-cache hit rate (from the workers' own counters), mean / p99 TTFT, and requests
per replica.

Run from the repository root (a CPU workload; the machine should be otherwise quiet):
    PYTHONPATH=. .venv/bin/python benchmarks/route_w9.py --commit "$(git rev-parse --short HEAD)"
Writes benchmarks/results/<stamp>-W9-route.json (and $OUT when set) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.route_fleet import CLI, Process, result_header, start_replicas, start_router
from lanner.bench.report import save_copies
from lanner.bench.server_metrics import metric_total, scrape_metrics
from lanner.engine.config import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("cache_aware", "least_load", "power_of_two", "round_robin")
MODEL = "lanner-demo"
VOCAB = 8192  # the demo model's


def worker_counts(url: str) -> dict[str, float]:
    samples = scrape_metrics(url)
    return {
        "queried": samples["lanner:prefix_cache_queries_total{}"],
        "hit": samples["lanner:prefix_cache_hits_total{}"],
        "finished": metric_total(samples, "lanner:request_success_total{"),
    }


def warm_up(replicas: list[Process]) -> None:
    """A few requests on each replica, so no policy pays the first steps' one-time costs."""
    body = {"model": MODEL, "prompt": list(range(1, 300)), "max_tokens": 8, "ignore_eos": True}
    for replica in replicas:
        for _ in range(3):
            httpx.post(f"{replica.url}/v1/completions", json=body, timeout=120).raise_for_status()


def run_policy(policy: str, replicas: list[Process], args: argparse.Namespace, logs: Path) -> dict:
    urls = [r.url for r in replicas]
    for url in urls:  # every policy starts from empty caches
        assert httpx.post(f"{url}/reset_prefix_cache", timeout=30).json()["emptied"]
    router = start_router(urls, ["--policy", policy], logs / f"router-{policy}.log")
    try:
        before = {url: worker_counts(url) for url in urls}
        load_before = os.getloadavg()
        bench_json = logs / f"bench-{policy}.json"
        command = [
            *CLI, "bench", "serve", "--base-url", router.url, "--model", MODEL,
            "--dataset-name", "tenants", "--num-tenants", str(args.num_tenants),
            "--tenant-prefix-len", str(args.prefix_len), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--request-rate", str(args.request_rate), "--vocab-size", str(VOCAB),
            "--temperature", "0", "--seed", str(args.seed), "--disable-tqdm",
            "--output-json", str(bench_json),
        ]  # fmt: skip
        print(f"[{policy}] {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        load_after = os.getloadavg()
        after = {url: worker_counts(url) for url in urls}
        decisions = {
            name.split("reason=", 1)[1].rstrip("}"): value
            for name, value in scrape_metrics(router.url).items()
            if name.startswith("lanner:router_decisions_total{")
        }
    finally:
        router.stop()
    run = json.loads(bench_json.read_text())["results"]["runs"][0]
    delta = {url: {k: after[url][k] - before[url][k] for k in after[url]} for url in urls}
    queried = sum(d["queried"] for d in delta.values())
    per_replica = [delta[url]["finished"] for url in urls]
    mean_share = sum(per_replica) / len(per_replica)
    return {
        "policy": policy,
        "prefix_cache_hit_rate": sum(d["hit"] for d in delta.values()) / queried,
        "per_replica_hit_rate": [d["hit"] / d["queried"] if d["queried"] else None
                                 for d in delta.values()],  # fmt: skip
        "requests_per_replica": per_replica,
        "max_share_over_mean": max(per_replica) / mean_share,
        "decisions": decisions,
        "completed": run["completed"],
        "failed": run["failed"],
        "errors": run["errors"],
        "duration_s": run["duration_s"],
        "request_throughput": run["request_throughput"],
        **{f"{stat}_{name}_ms": run[f"{stat}_{name}_ms"]
           for name in ("ttft", "tpot", "e2el") for stat in ("mean", "median", "p99")},
        "load_average_1m": [load_before[0], load_after[0]],
    }  # fmt: skip


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [run["policy"] for run in runs]
    fig, (hits, ttft, shares) = plt.subplots(1, 3, figsize=(14, 4))
    hits.bar(names, [run["prefix_cache_hit_rate"] for run in runs], color="tab:green")
    hits.set_ylabel("aggregate prefix-cache hit rate")
    hits.set_ylim(0, 1)
    positions = range(len(runs))
    ttft.bar([p - 0.2 for p in positions], [r["mean_ttft_ms"] for r in runs], 0.4, label="mean")
    ttft.bar([p + 0.2 for p in positions], [r["p99_ttft_ms"] for r in runs], 0.4, label="p99")
    ttft.set_xticks(list(positions), names)
    ttft.set_ylabel("TTFT (ms)")
    ttft.legend()
    width = 0.8 / len(runs[0]["requests_per_replica"])
    for replica in range(len(runs[0]["requests_per_replica"])):
        shares.bar([p + (replica - 1) * width for p in positions],
                   [r["requests_per_replica"][replica] for r in runs], width,
                   label=f"replica {replica}")  # fmt: skip
    shares.set_xticks(list(positions), names)
    shares.set_ylabel("requests served")
    shares.legend(fontsize=8)
    for ax in (hits, ttft, shares):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--request-rate", type=float, default=3.0)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--num-tenants", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=400)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--num-gpu-blocks", type=int, default=192,
                        help="KV blocks (16 tokens each) per replica: ~7 of the 16 system "
                        "prompts fit, so where a tenant goes decides its hits")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    serve_args = [str(DEFAULT_MODEL_DIR), "--dtype", "float32", "--device", "cpu",
                  "--max-model-len", "512", "--num-gpu-blocks-override",
                  str(args.num_gpu_blocks)]  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="lanner-w9-"))
    started = time.time()
    replicas = start_replicas(args.replicas, serve_args, logs)
    runs = []
    try:
        warm_up(replicas)
        for policy in args.policies.split(","):
            runs.append(run_policy(policy, replicas, args, logs))
            shown = {k: v for k, v in runs[-1].items() if not isinstance(v, (list, dict))}
            print(json.dumps(shown), flush=True)
    finally:
        for replica in replicas:
            replica.stop()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    result = result_header(
        "W9",
        args.commit,
        started,
        model="demo-model",
        config={**vars(args), "serve_args": serve_args, "omp_num_threads": 1},
        note="shared CPU machine: other engineers' jobs ran beside this one; "
        "load_average_1m holds the 1-minute load before and after each policy's run",
        runs=runs,
    )
    name = f"{stamp}-W9-route.json"
    save_copies(result, RESULTS, name)
    print(f"wrote {RESULTS / name}")
    title = (f"W9 on the CPU: {args.replicas} replicas, {args.num_tenants} tenants, "
             f"{args.num_prompts} requests at {args.request_rate:g} req/s")  # fmt: skip
    plot(runs, RESULTS / f"{stamp}-W9-route.png", title)


if __name__ == "__main__":
    main()
