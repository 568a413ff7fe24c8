"""What the host pays, per call, for the small operations a decode or speculative step is
made of: a list to the device through `to_device` (tensor + pin + copy), a copy from a
pinned buffer that stays, a CUDA graph replay by its number of kernels, a Triton launch,
a small torch indexing op, and a device-to-host read of a few ints. The device is kept
busy behind a long kernel while the host calls are timed, as in the engine (launches
queue behind the step running), and idle in a second pass.

On the GPU machine, from the repository root (~30 s):
    PYTHONPATH=. python3 benchmarks/host_costs.py --commit $(git rev-parse --short HEAD)
Writes benchmarks/results/<stamp>-host-costs.json (and $OUT); prints µs per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from lanner.bench.report import card_name, save_copies
from lanner.kernels.rms_norm import rms_norm
from lanner.kernels.transfer import to_device

RESULTS = Path(__file__).resolve().parent / "results"


def _busy(device: torch.device) -> None:
    """Queue ~20 ms of device work so host calls do not wait on an idle device's
    first-launch path (and nothing they queue runs before the host is done)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(30):
        a = a @ a
        a = a / a.abs().amax()


def _per_call_us(call, repeats: int, device: torch.device, busy: bool) -> float:
    """Median host time of one call, over batches of 50 calls."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        if busy:
            _busy(device)
        start = time.perf_counter()
        for _ in range(50):
            call()
        samples.append((time.perf_counter() - start) / 50 * 1e6)
    torch.cuda.synchronize(device)
    return statistics.median(samples)


def _graph(nodes: int, device: torch.device) -> torch.cuda.CUDAGraph:
    """A graph of ``nodes`` small Triton kernels (RMS norms of one 384-wide row)."""
    x = torch.randn(1, 384, device=device, dtype=torch.bfloat16)
    w = torch.ones(384, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        rms_norm(x, w, 1e-6)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(nodes):
            y = rms_norm(y, w, 1e-6)
    return graph


def _graph_us(call, device: torch.device, calls: int = 20) -> float:
    """Device time of one call: ``calls`` of them captured in a graph, its replays timed."""
    for _ in range(3):
        call()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def argmax_against_race(device: torch.device, repeats: int) -> list[dict]:
    """Greedy tokens two ways, by rows and vocabulary: torch.argmax (one ATen launch) and
    the chunked race kernel (two Triton launches): host µs a call and device µs a call."""
    from lanner.kernels.sampling import exponential_race

    rows_out = []
    for vocab in (8192, 32768, 128256, 151936):
        for rows in (1, 6, 64, 256):
            logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16)
            ways = {
                "torch.argmax": partial(torch.argmax, logits, -1),
                "race kernel": partial(exponential_race, logits, None, None),
            }
            assert torch.equal(ways["torch.argmax"](), ways["race kernel"]())
            for name, call in ways.items():
                rows_out.append(
                    {
                        "vocab": vocab,
                        "rows": rows,
                        "way": name,
                        "host_us": _per_call_us(call, repeats, device, True),
                        "device_us": _graph_us(call, device),
                    }
                )
    return rows_out


def probe_cores(rounds: int = 3) -> dict[int, list[float]]:
    """The pure-Python probe of spec_profile.py (ms) on each core this process may use,
    pinned there in turn, ``rounds`` times over all cores: whether some cores run Python
    slower than others (the GPU machine's host ran the same step at 2x between runs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from spec_decode import host_probe_ms

    allowed = sorted(os.sched_getaffinity(0))
    times: dict[int, list[float]] = {core: [] for core in allowed}
    try:
        for _ in range(rounds):
            for core in allowed:
                os.sched_setaffinity(0, {core})
                times[core].append(host_probe_ms())
    finally:
        os.sched_setaffinity(0, allowed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--probe-cores",
        action="store_true",
        help="only time the Python probe on each core; prints BEST_CORE=<n> last",
    )
    args = parser.parse_args()
    if args.probe_cores:
        times = probe_cores()
        for core, values in times.items():
            print(f"core {core:3}: " + " ".join(f"{v:6.2f}" for v in values) + " ms")
        best = min(times, key=lambda core: statistics.median(times[core]))
        save_copies(
            {
                "workload": "pure-Python probe per core",
                "card": card_name(),
                "commit": args.commit,
                "command": "PYTHONPATH=. python3 benchmarks/host_costs.py "
                + " ".join(sys.argv[1:]),
                "probe_ms_by_core": times,
            },
            RESULTS,
            f"{time.strftime('%Y%m%d-%H%M%S')}-host-cores.json",
        )
        print(f"BEST_CORE={best}")
        return
    device = torch.device("cuda")
    small = list(range(6))
    wide = list(range(256))
    pinned = torch.zeros(256, dtype=torch.long, pin_memory=True)
    target = torch.zeros(256, dtype=torch.long, device=device)
    source = torch.arange(256, device=device)
    index = torch.arange(6, device=device)
    x = torch.randn(1, 384, device=device, dtype=torch.bfloat16)
    w = torch.ones(384, device=device, dtype=torch.bfloat16)
    graphs = {n: _graph(n, device) for n in (1, 16, 64, 160, 320)}
    host_out = torch.zeros(8, dtype=torch.long, pin_memory=True)
    calls = {
        "to_device(6 ints)": lambda: to_device(small, torch.long, device),
        "to_device(256 ints)": lambda: to_device(wide, torch.long, device),
        "torch.tensor(6 ints)": lambda: torch.tensor(small, dtype=torch.long),
        "torch.tensor(6).pin_memory()": lambda: torch.tensor(small, dtype=torch.long).pin_memory(),
        "numpy write + copy_ from a kept pinned buffer": lambda: (
            pinned.numpy().__setitem__(slice(0, 6), small),
            target[:6].copy_(pinned[:6], non_blocking=True),
        ),
        "rms_norm launch (Triton)": lambda: rms_norm(x, w, 1e-6),
        "index_select(6)": lambda: source.index_select(0, index),
        "index_put (x[idx] = v)": lambda: target.__setitem__(index, source[:6]),
        **{f"graph replay, {n} kernels": graphs[n].replay for n in graphs},
    }
    results = {}
    for busy in (True, False):
        key = "device busy" if busy else "device idle"
        results[key] = {}
        for name, call in calls.items():
            for _ in range(3):
                call()
            results[key][name] = _per_call_us(call, args.repeats, device, busy)

    # A device-to-host read of a few ints once the device is idle: the step's one sync.
    def read() -> None:
        host_out.copy_(source[:8], non_blocking=True)
        torch.cuda.current_stream(device).synchronize()

    results["device idle"]["read 8 ints back (copy + stream sync)"] = _per_call_us(
        read, args.repeats, device, False
    )
    greedy = argmax_against_race(device, args.repeats)
    print(f"{'call':50} {'busy µs':>9} {'idle µs':>9}")
    for name in results["device idle"]:
        busy = results["device busy"].get(name)
        print(
            f"{name:50} {busy if busy is not None else float('nan'):9.1f} "
            f"{results['device idle'][name]:9.1f}"
        )
    print(f"{'greedy tokens':28} {'vocab':>7} {'rows':>5} {'host µs':>8} {'device µs':>9}")
    for row in greedy:
        print(
            f"{row['way']:28} {row['vocab']:7} {row['rows']:5} {row['host_us']:8.1f} "
            f"{row['device_us']:9.1f}"
        )
    save_copies(
        {
            "workload": "host cost of small device operations",
            "card": card_name(),
            "commit": args.commit,
            "command": "PYTHONPATH=. python3 benchmarks/host_costs.py " + " ".join(sys.argv[1:]),
            "us_per_call": results,
            "greedy_tokens": greedy,
        },
        RESULTS,
        f"{time.strftime('%Y%m%d-%H%M%S')}-host-costs.json",
    )


if __name__ == "__main__":
    main()
