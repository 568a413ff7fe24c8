"""What `lanner router` adds to time to first token at 200 concurrent streams, on the CPU:
the same client, at the same 200 streams, against one worker directly and through a
router in front of that worker, in many short alternating rounds.

TTFT is the time from sending an OpenAI streaming /v1/completions request to the first
SSE event that carries text, at the client. The figure is the median, over pairs of
rounds (one direct, one routed, their order alternating), of the routed round's median
TTFT minus the direct one's, with its quartiles and range.

Why not `lanner bench serve` here: on a 2-core machine client, router and worker share
the cores, and whatever CPU any of them burns becomes queueing for the others, which
the TTFT of every side then shows. The client below is one asyncio process that does
per request one aiohttp POST, one json.loads (of the first event) and a byte count, and
the stub worker (aiohttp.web) answers from pre-encoded chunks; each round records the
CPU seconds of client, router and stub, so the JSON shows how busy each was.

Workers:
- `stub` (default): first text event `--stub-first-token-ms` after the request, then one
  every `--stub-token-gap-ms`, `--output-len` events in all, then [DONE]; no model, so
  what moves between the sides is the router;
- `lanner`: the demo model behind `lanner serve` (its own TTFT noise at 200 streams on
  the CPU is seconds, far above 2 ms).

The stub's default pace, 4 text events a stream 250 ms apart, makes 200 streams about 200
requests and 1,000 events a second, so that client, router and stub together fit in the
2 cores; the JSON's CPU per request at two paces gives the router's cost per event, to
carry the figure to other paces (`--output-len 16 --stub-token-gap-ms 20` is a token
every 20 ms, 570 requests and 9,700 events a second at 200 streams).

Short rounds, many of them: on a machine shared with other users' jobs the load drifts
within seconds, and a pair of adjacent rounds sees about the same drift.

Run from the repository root (CPU, as root for --realtime; about 2 minutes):
    PYTHONPATH=. .venv/bin/python benchmarks/route_overhead.py --realtime \
        --commit "$(git rev-parse --short HEAD)"
--realtime puts client, router and stub under SCHED_RR: each runs as soon as it is woken
instead of waiting out the time slices of other users' jobs (which, on 2 shared cores,
otherwise move one round's median TTFT by tens of ms); the three still share the cores
with each other, so the router's own CPU time still delays the others. With
--router-cpus 0 the router runs on CPU 0 alone and the client and stub on the others.
Writes benchmarks/results/<stamp>-route-overhead.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from benchmarks.route_fleet import (
    free_port,
    result_header,
    start_replicas,
    start_router,
    wait_healthy,
)
from lanner.bench.report import save_copies
from lanner.engine.config import DEFAULT_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the stub worker -----------------------------------------------------------------------


def stub_app(first_token_s: float, token_gap_s: float) -> web.Application:
    """An OpenAI-shaped worker that streams `max_tokens` one-token completion events on a
    fixed clock (no model): headers at once, as a real server sends them before prefill."""
    choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}
    event = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
             "choices": [choice]}  # fmt: skip
    chunk = f"data: {json.dumps(event)}\n\n".encode()
    done = b"data: [DONE]\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(first_token_s)
        for index in range(int(body.get("max_tokens", 16))):
            if index:
                await asyncio.sleep(token_gap_s)
            await response.write(chunk)
        await response.write(done)
        await response.write_eof()
        return response

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text="lanner:num_requests_waiting 0.0\n")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    return app


# -- the client ----------------------------------------------------------------------------


def _has_text(event: bytes) -> bool:
    """Whether one SSE event carries generated text (a completion's or a chat delta's)."""
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return False
    choices = json.loads(event[6:]).get("choices") or [{}]
    first = choices[0]
    return bool(first.get("text") or (first.get("delta") or {}).get("content"))


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """(TTFT in seconds, bytes received) of one streamed completion; raises on failure."""
    sent = time.perf_counter()
    ttft = None
    size, buffer, tail = 0, b"", b""
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        async for piece in r.content.iter_any():
            size += len(piece)
            if ttft is None:
                buffer += piece
                while ttft is None and b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if _has_text(event):
                        ttft = time.perf_counter() - sent
            tail = (tail + piece)[-16:]
    if ttft is None or not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError("the stream ended without text or without [DONE]")
    return ttft, size


async def run_round(
    url: str, model: str, args: argparse.Namespace, round_index: int
) -> dict[str, Any]:
    """`args.concurrency` users, each sending one request after another for
    `args.round_s` seconds; TTFTs of requests sent after `args.warmup_s` count."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
    )
    started = time.perf_counter()
    count_from = started + args.warmup_s
    stop_at = count_from + args.round_s
    ttfts: list[float] = []
    errors: list[str] = []
    sent = 0

    # Users start at random points of one request's length, so the 200 streams arrive
    # spread out as independent clients do, not in one wave that a fixed-clock worker
    # would then keep in step.
    offsets = random.Random(round_index).sample(range(10**6), args.concurrency)

    async def user(index: int) -> None:
        nonlocal sent
        await asyncio.sleep(offsets[index] / 10**6 * args.stagger_s)
        while time.perf_counter() < stop_at:
            body = json.dumps({
                "model": model, "prompt": f"request {round_index}.{index}.{sent}: hello",
                "max_tokens": args.output_len, "stream": True, "temperature": 0,
            }).encode()  # fmt: skip
            sent += 1
            began = time.perf_counter()
            try:
                ttft, _ = await one_request(session, url + "/v1/completions", body)
            except (aiohttp.ClientError, RuntimeError) as err:
                errors.append(f"{type(err).__name__}: {err}"[:200])
                continue
            if began >= count_from:
                ttfts.append(ttft)

    cpu_before = time.process_time()
    try:
        await asyncio.gather(*(user(i) for i in range(args.concurrency)))
    finally:
        await session.close()
    wall = time.perf_counter() - started
    return {
        "ttfts": ttfts,
        "errors": errors,
        "sent": sent,
        "client_cpu_s": time.process_time() - cpu_before,
        "wall_s": wall,
    }


# -- measurement ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _pin(cpus: set[int] | None, realtime: bool = False) -> Any:
    """A preexec_fn putting a child on ``cpus`` (None: anywhere), and under SCHED_RR
    when ``realtime``."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if realtime:
            _make_realtime(0)

    return setup if cpus or realtime else None


def _make_realtime(pid: int) -> None:
    """SCHED_RR at the lowest real-time priority for every thread of ``pid`` (0: this
    one): woken, it runs at once instead of waiting out other users' time slices."""
    tasks = [pid] if pid == 0 else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for task in tasks:
        os.sched_setscheduler(task, os.SCHED_RR, os.sched_param(1))


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0]] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def summarize(side: dict[str, Any], cpu: dict[str, float]) -> dict:
    ttfts = sorted(side["ttfts"])
    ms = [t * 1000 for t in ttfts]
    out = {
        "median_ttft_ms": statistics.median(ms),
        "mean_ttft_ms": statistics.fmean(ms),
        "p90_ttft_ms": ms[int(0.9 * (len(ms) - 1))],
        "p99_ttft_ms": ms[int(0.99 * (len(ms) - 1))],
        "counted": len(ms),
        "sent": side["sent"],
        "failed": len(side["errors"]),
        "request_throughput": side["sent"] / side["wall_s"],
        "client_cpu_share": side["client_cpu_s"] / side["wall_s"],
    }
    for name, seconds in cpu.items():
        out[f"{name}_cpu_share"] = seconds / side["wall_s"]
        out[f"{name}_cpu_us_per_request"] = seconds / max(1, side["sent"]) * 1e6
    return out


def compare(worker_url: str, worker_pid: int, model: str, args: argparse.Namespace,
            logs: Path) -> dict:  # fmt: skip
    router = start_router([worker_url], ["--policy", args.policy], logs / f"router-{model}.log")
    if args.router_cpus:
        os.sched_setaffinity(router.process.pid, args.router_cpus)
    if args.realtime:
        _make_realtime(router.process.pid)
    pids = {"router": router.process.pid, "worker": worker_pid}
    pairs = []
    try:
        for url in (worker_url, router.url):  # warm both paths up; not counted
            uvloop.run(run_round(url, model, args, -1))
        for index in range(args.rounds):
            # Alternate the order, so a drift in the machine's load favours neither side.
            order = ("direct", "router") if index % 2 == 0 else ("router", "direct")
            figures: dict[str, Any] = {"order": list(order)}
            for side in order:
                url = worker_url if side == "direct" else router.url
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                measured = uvloop.run(run_round(url, model, args, index))
                cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                if side == "direct":
                    cpu.pop("router")
                if measured["errors"]:
                    raise RuntimeError(f"{side} round {index}: {measured['errors'][:3]}")
                figures[side] = summarize(measured, cpu)
            figures["added_median_ttft_ms"] = (figures["router"]["median_ttft_ms"]
                                               - figures["direct"]["median_ttft_ms"])  # fmt: skip
            figures["load_average_1m"] = os.getloadavg()[0]
            print(f"[{model} pair {index}] added {figures['added_median_ttft_ms']:+.2f} ms "
                  f"(direct {figures['direct']['median_ttft_ms']:.2f}, router "
                  f"{figures['router']['median_ttft_ms']:.2f}; router CPU "
                  f"{figures['router']['router_cpu_us_per_request']:.0f} us/request, "
                  f"{figures['router']['router_cpu_share']:.0%}; client "
                  f"{figures['router']['client_cpu_share']:.0%}, worker "
                  f"{figures['router']['worker_cpu_share']:.0%}; load "
                  f"{figures['load_average_1m']:.2f})", flush=True)  # fmt: skip
            pairs.append(figures)
    finally:
        router.stop()
    added = [p["added_median_ttft_ms"] for p in pairs]
    q1, q2, q3 = _quartiles(added)
    return {
        "pairs": pairs,
        "added_median_ttft_ms_per_pair": added,
        "added_median_ttft_ms_median": q2,
        "added_median_ttft_ms_quartiles": [q1, q3],
        "added_median_ttft_ms_range": [min(added), max(added)],
        "direct_median_ttft_ms_median": statistics.median(
            p["direct"]["median_ttft_ms"] for p in pairs
        ),
        "router_cpu_us_per_request_median": statistics.median(
            p["router"]["router_cpu_us_per_request"] for p in pairs
        ),
        "load_average_1m_range": [
            min(p["load_average_1m"] for p in pairs),
            max(p["load_average_1m"] for p in pairs),
        ],  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--workers", default="stub", help="stub, lanner or stub,lanner")
    parser.add_argument("--policy", default="round_robin")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20, help="pairs of rounds")
    parser.add_argument("--round-s", type=float, default=1.5, help="counted seconds a round")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="uncounted, each round")
    parser.add_argument("--output-len", type=int, default=4, help="text events a stream")
    parser.add_argument(
        "--stagger-s", type=float, default=None,
        help="users start spread over this many seconds (default: one stub stream's length)",
    )  # fmt: skip
    parser.add_argument("--stub-first-token-ms", type=float, default=50.0)
    parser.add_argument("--stub-token-gap-ms", type=float, default=250.0)
    parser.add_argument(
        "--router-cpus",
        default=None,
        help="CPUs for the router alone, e.g. 0 (the client and worker get the others)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="client, router and stub under SCHED_RR (root), so that other users' jobs "
        "on a shared machine do not delay their wake-ups",
    )
    parser.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub is not None:  # the stub worker's own process
        app = stub_app(args.stub_first_token_ms / 1000, args.stub_token_gap_ms / 1000)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        web.run_app(app, host="127.0.0.1", port=args.serve_stub, print=None,
                    access_log=None, backlog=1024)  # fmt: skip
        return
    if args.realtime and args.workers != "stub":
        parser.error("--realtime is for the stub worker alone (a model at real-time "
                     "priority would starve the machine)")  # fmt: skip
    if args.stagger_s is None:
        gaps = (args.output_len - 1) * args.stub_token_gap_ms
        args.stagger_s = (args.stub_first_token_ms + gaps) / 1000
    args.router_cpus = {int(c) for c in args.router_cpus.split(",")} if args.router_cpus else None
    args.others = os.sched_getaffinity(0) - args.router_cpus if args.router_cpus else None
    if args.others:
        os.sched_setaffinity(0, args.others)  # the client (this process)
    if args.realtime:
        _make_realtime(0)
    logs = Path(tempfile.mkdtemp(prefix="lanner-overhead-"))
    started = time.time()
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    for worker in args.workers.split(","):
        if worker == "stub":
            port = free_port()
            stub = subprocess.Popen(
                [sys.executable, __file__, "--serve-stub", str(port),
                 "--stub-first-token-ms", str(args.stub_first_token_ms),
                 "--stub-token-gap-ms", str(args.stub_token_gap_ms)],
                env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")},
                preexec_fn=_pin(args.others, args.realtime),
            )  # fmt: skip
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, stub, 60)
                results["stub"] = compare(url, stub.pid, "stub", args, logs)
            finally:
                stub.terminate()
                stub.wait(10)
        else:
            serve_args = [str(DEFAULT_MODEL_DIR), "--dtype", "float32", "--device", "cpu",
                          "--max-model-len", "512", "--num-gpu-blocks-override",
                          "4096"]  # fmt: skip
            [replica] = start_replicas(1, serve_args, logs)
            try:
                results["lanner"] = compare(replica.url, replica.process.pid, "lanner-demo",
                                            args, logs)  # fmt: skip
            finally:
                replica.stop()
    for name, figures in results.items():
        print(f"{name}: router adds {figures['added_median_ttft_ms_median']:+.2f} ms to median "
              f"TTFT (quartiles {figures['added_median_ttft_ms_quartiles'][0]:+.2f} / "
              f"{figures['added_median_ttft_ms_quartiles'][1]:+.2f}, range "
              f"{figures['added_median_ttft_ms_range'][0]:+.2f} / "
              f"{figures['added_median_ttft_ms_range'][1]:+.2f}) over "
              f"{len(figures['pairs'])} pairs; direct median "
              f"{figures['direct_median_ttft_ms_median']:.2f} ms")  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    result = result_header(
        "route-overhead",
        args.commit,
        started,
        config={**vars(args), "router_cpus": sorted(args.router_cpus or []),
                "others": sorted(args.others or [])},
        load_average_before=list(load_before),
        load_average_after=list(os.getloadavg()),
        note="TTFT: request sent to the first SSE event with text, at the client; "
        "added_median_ttft_ms = the routed round's median TTFT - the direct round's, per "
        "pair of rounds; *_cpu_share: CPU seconds / wall seconds of the round",
        results=results,
    )  # fmt: skip
    name = f"{stamp}-route-overhead.json"
    save_copies(result, RESULTS, name)
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
