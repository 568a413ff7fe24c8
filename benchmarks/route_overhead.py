"""What `lanner router` adds to time to first token at 200 concurrent streams, on the CPU:
`lanner bench serve --max-concurrency 200` against one worker directly, then through a
router in front of that worker, alternating, several rounds.

Two workers, because a CPU `lanner serve` at 200 streams has a TTFT of seconds that
moves by tens of milliseconds from run to run, far more than the 2 ms to resolve:
- `stub`: a minimal OpenAI-shaped streaming server (below) whose first token comes a
  fixed 50 ms after the request and the rest every 20 ms, so what moves is the router;
- `lanner`: the demo model behind `lanner serve`, the real thing, with its noise.

Run from the repository root (CPU; the machine should be otherwise quiet):
    PYTHONPATH=. .venv/bin/python benchmarks/route_overhead.py --commit "$(git rev-parse HEAD)"
With --router-cpus 0 the router runs on CPU 0 alone and the client and worker on the
others (in both the direct and the routed runs), so that what is measured is the router's
hop, not the three processes queueing for the same cores.
Writes benchmarks/results/<stamp>-route-overhead.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from benchmarks.route_fleet import (
    CLI,
    free_port,
    result_header,
    start_replicas,
    start_router,
    wait_healthy,
)
from lanner.bench.report import save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"
STUB_FIRST_TOKEN_S = 0.05
STUB_TOKEN_GAP_S = 0.02


def stub_app() -> Any:
    """An OpenAI-shaped worker that streams `max_tokens` one-token chunks on a fixed
    clock (no model), for measuring what sits in front of it."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("lanner:num_requests_waiting 0.0\n")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> Any:
            await asyncio.sleep(STUB_FIRST_TOKEN_S)
            for index in range(body.get("max_tokens", 16)):
                if index:
                    await asyncio.sleep(STUB_TOKEN_GAP_S)
                chunk = {"id": "cmpl-stub", "object": "text_completion", "model": "stub",
                         "choices": [{"index": 0, "text": "x", "finish_reason": None}]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def bench(url: str, model: str, args: argparse.Namespace, out: Path, seed: int) -> dict:
    command = [
        *CLI, "bench", "serve", "--base-url", url, "--model", model,
        "--dataset-name", "random", "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--vocab-size", "8000",
        "--temperature", "0", "--seed", str(seed), "--disable-tqdm", "--output-json", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, preexec_fn=_pin(args.others))
    run = json.loads(out.read_text())["results"]["runs"][0]
    assert run["failed"] == 0, run["errors"]
    return {k: run[k] for k in ("median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms",
                                "median_itl_ms", "request_throughput", "completed")}  # fmt: skip


def _pin(cpus: set[int] | None) -> Any:
    """A preexec_fn putting a child on ``cpus`` (None: anywhere)."""
    return None if not cpus else lambda: os.sched_setaffinity(0, cpus)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = Path(f"/proc/{parent}/task/{parent}/children")
        if children.exists():
            found = [int(c) for c in children.read_text().split()]
            tree += found
            frontier += found
    return tree


def compare(worker_url: str, model: str, args: argparse.Namespace, logs: Path) -> dict:
    router = start_router([worker_url], ["--policy", "round_robin"], logs / f"router-{model}.log")
    if args.router_cpus:
        for pid in _process_tree(router.process.pid):
            os.sched_setaffinity(pid, args.router_cpus)
    rounds = []
    try:
        for index in range(args.rounds):
            # Alternate the order, so a drift in the machine's load favours neither side.
            order = ("direct", "router") if index % 2 == 0 else ("router", "direct")
            figures = {}
            for side in order:
                url = worker_url if side == "direct" else router.url
                out = logs / f"{model}-{index}-{side}.json"
                figures[side] = bench(url, model, args, out, seed=index)
            figures["added_median_ttft_ms"] = (figures["router"]["median_ttft_ms"]
                                               - figures["direct"]["median_ttft_ms"])  # fmt: skip
            figures["load_average_1m"] = os.getloadavg()[0]
            print(f"[{model} round {index}] {json.dumps(figures)}", flush=True)
            rounds.append(figures)
    finally:
        router.stop()
    added = [r["added_median_ttft_ms"] for r in rounds]
    return {
        "rounds": rounds,
        "added_median_ttft_ms_per_round": added,
        "added_median_ttft_ms_median": statistics.median(added),
        "direct_median_ttft_ms_spread": [
            min(r["direct"]["median_ttft_ms"] for r in rounds),
            max(r["direct"]["median_ttft_ms"] for r in rounds),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--workers", default="stub,lanner")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--router-cpus",
        default=None,
        help="CPUs for the router alone, e.g. 0 (the client and worker get the others)",
    )
    parser.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.router_cpus = {int(c) for c in args.router_cpus.split(",")} if args.router_cpus else None
    args.others = os.sched_getaffinity(0) - args.router_cpus if args.router_cpus else None
    if args.serve_stub is not None:  # the stub worker's own process
        import uvicorn

        uvicorn.run(stub_app(), host="127.0.0.1", port=args.serve_stub, log_level="warning")
        return
    logs = Path(tempfile.mkdtemp(prefix="lanner-overhead-"))
    started = time.time()
    results: dict[str, Any] = {}
    for worker in args.workers.split(","):
        if worker == "stub":
            port = free_port()
            stub = subprocess.Popen(
                [sys.executable, __file__, "--serve-stub", str(port)],
                env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")},
                preexec_fn=_pin(args.others),
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, stub, 60)
                results["stub"] = compare(url, "stub", args, logs)
            finally:
                stub.terminate()
                stub.wait(10)
        else:
            serve_args = [str(DEFAULT_MODEL_DIR), "--dtype", "float32", "--device", "cpu",
                          "--max-model-len", "512", "--num-gpu-blocks-override",
                          "4096"]  # fmt: skip
            [replica] = start_replicas(1, serve_args, logs)
            try:
                results["lanner"] = compare(replica.url, "lanner-demo", args, logs)
            finally:
                replica.stop()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    result = result_header(
        "route-overhead",
        args.commit,
        started,
        config={**vars(args), "router_cpus": sorted(args.router_cpus or []),
                "others": sorted(args.others or []),
                "stub_first_token_s": STUB_FIRST_TOKEN_S, "stub_token_gap_s": STUB_TOKEN_GAP_S},
        note="router_cpus empty: client, router and worker share the machine's cores; "
        "added_median_ttft_ms = router's median TTFT - direct's, per round",
        results=results,
    )  # fmt: skip
    name = f"{stamp}-route-overhead.json"
    save_copies(result, RESULTS, name)
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
