"""What every bench writes: one JSON file (workload, model, card, commit, command line,
figures) and, on request, PNG figures drawn with matplotlib's Agg backend."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Where results land by default: this folder when run from a lanner checkout (it exists
# there), else the current directory.
RESULTS_DIR = Path("benchmarks") / "results"
PERCENTILES = (50, 90, 99)


def card_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken CUDA setup still benches as "cpu"
        pass
    return "cpu"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_commit() -> str:
    """The checkout's commit; LANNER_COMMIT overrides it where the tree was copied
    without its git history (a remote benchmark machine)."""
    if os.environ.get("LANNER_COMMIT"):
        return os.environ["LANNER_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, median, std and the p50/p90/p99 of `values` (NaN for an empty list)."""
    import numpy as np

    if not values:
        nan = float("nan")
        return {"mean": nan, "median": nan, "std": nan, **{f"p{q}": nan for q in PERCENTILES}}
    array = np.asarray(values, dtype=float)
    stats = {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "std": float(array.std()),
    }
    for q in PERCENTILES:
        stats[f"p{q}"] = float(np.percentile(array, q))
    return stats


def new_result(workload: str, model: str) -> dict[str, Any]:
    return {
        "workload": workload,
        "model": model,
        "card": card_name(),
        "commit": git_commit(),
        "command": command_line(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_results_dir() -> Path:
    return RESULTS_DIR if RESULTS_DIR.is_dir() else Path(".")


def default_json_path(workload: str, results_dir: str | Path | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    return folder / f"{stamp}-bench-{workload}.json"


def _clean(value: Any) -> Any:
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def save_copies(result: dict[str, Any], results_dir: Path, name: str) -> None:
    """Write ``result`` as ``name`` into ``results_dir`` and, when set, into $OUT: what a
    device-machine run leaves there comes back to the development machine."""
    folders = [results_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(result, indent=2))


def save_stamped(result: dict[str, Any], results_dir: Path, suffix: str) -> Path:
    """save_copies as ``<stamp>-<suffix>.json`` (now, local time), and say where."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}.json"
    save_copies(result, results_dir, name)
    print(f"wrote {results_dir / name}")
    return results_dir / name


# Files already announced: with --plot a result is written again with its figures' paths,
# and saying "wrote" once is enough.
_announced: set[Path] = set()


def write_json(
    result: dict[str, Any], path: str | Path | None, results_dir: str | Path | None = None
) -> Path:
    """Write ``result`` to ``path``, or a stamped file in ``results_dir`` (default: see
    RESULTS_DIR); says where, the first time."""
    target = Path(path) if path else default_json_path(result["workload"], results_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_clean(result), indent=2) + "\n")
    if target.resolve() not in _announced:
        _announced.add(target.resolve())
        print(f"wrote {target}")
    return target


def figure_path(json_path: Path, suffix: str) -> Path:
    return json_path.with_name(f"{json_path.stem}-{suffix}.png")


def _pyplot():  # noqa: ANN202
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install 'lanner[bench]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(series: dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """One panel per latency (values in ms): the share of requests at or below x."""
    import numpy as np

    plt = _pyplot()
    names = [name for name, values in series.items() if len(values) > 0]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=False):
        values = np.sort(np.asarray(series[name], dtype=float))
        shares = np.arange(1, len(values) + 1) / len(values)
        ax.step(values, shares, where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def plot_sweep(runs: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Throughput and latency (median and p99) against the offered request rate."""
    plt = _pyplot()
    finite = list(runs)
    labels = [f"{float(run['request_rate']):g}" for run in finite]
    positions = list(range(len(finite)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(positions, [run["output_throughput"] for run in finite], "o-", label="output tok/s")
    left.plot(
        positions, [run["total_token_throughput"] for run in finite], "s-", label="total tok/s"
    )
    left.set_ylabel("tokens/s")
    for name in ("ttft", "tpot", "e2el"):
        right.plot(
            positions, [run[f"median_{name}_ms"] for run in finite], "o-", label=f"{name} median"
        )
        right.plot(positions, [run[f"p99_{name}_ms"] for run in finite], "x--", label=f"{name} p99")
    right.set_ylabel("ms")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xticks(positions, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path
