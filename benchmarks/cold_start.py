"""Cold start: from `lanner serve` (a fresh process) to the first served token, with an
empty and with a warm Triton cache, and where the time goes (the startup log's phases:
imports, weights, profile run and kernel compile, KV cache, CUDA graph capture); plus
the offline path's import cost (`python -X importtime`).

On a GPU (defaults: the llama3-8b shape, random weights, bf16):
    PYTHONPATH=. python3 benchmarks/cold_start.py --commit $(git rev-parse --short HEAD)
On the CPU (defaults: the embedded demo model):
    PYTHONPATH=. .venv/bin/python benchmarks/cold_start.py --commit $(git rev-parse --short HEAD)

Each trial starts the server in its own process group with TRITON_CACHE_DIR set (a fresh
folder for "empty"; the folder an earlier trial filled for "warm"), sends one 1-token
completion as soon as the port answers, and records process start -> first token, the
startup phases the engine core and the API server log. Writes
benchmarks/results/<stamp>-cold-start.json (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lanner.bench.report import new_result, save_copies  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "lanner" / "assets" / "demo-model"
SHAPE_8B = REPO / "benchmarks" / "shapes" / "llama3-8b"
PHASES = re.compile(r"startup(?: \((\w+)\))?: (.*)$")  # "startup: ..." is the engine core's
SERVER_MODULES = ("fastapi", "uvicorn", "zmq", "prometheus_client", "httpx", "msgspec")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_token(url: str, deadline: float) -> float:
    """Poll with a 1-token completion until the server answers one; returns the time
    (perf_counter) the answer arrived."""
    body = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 1, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310
                if reply.status == 200 and json.loads(reply.read())["usage"]["completion_tokens"]:
                    return time.perf_counter()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)
    raise TimeoutError("no token before the deadline")


def parse_phases(log: str) -> list[dict[str, float | str]]:
    """Every 'startup[ (who)]: name 1.23 s, ...' line of the log (the engine core's, the
    API server's), as {"who": who, name: seconds}."""
    found: list[dict[str, float | str]] = []
    for line in log.splitlines():
        match = PHASES.search(line)
        if match:
            parts = [p.rsplit(" ", 2) for p in match.group(2).split(", ")]
            found.append({"who": match.group(1) or "engine core"})
            found[-1].update({name: float(value) for name, value, _ in parts})
    return found


def serve_trial(args: argparse.Namespace, cache_dir: Path, label: str, log_dir: Path) -> dict:
    port = free_port()
    log_path = log_dir / f"{label}-{port}.log"
    command = [
        sys.executable, "-m", "lanner.entrypoints.cli", "serve", args.model,
        "--host", "127.0.0.1", "--port", str(port), *args.engine_args,
    ]  # fmt: skip
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            arrived = first_token(f"http://127.0.0.1:{port}", started + args.timeout)
        except TimeoutError:
            arrived = None
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    log_text = log_path.read_text(errors="replace")
    trial = {
        "label": label,
        "process_start_to_first_token_s": None if arrived is None else arrived - started,
        "startup_phases_s": parse_phases(log_text),
        "log_tail": log_text[-3000:] if arrived is None else None,
    }
    seconds = trial["process_start_to_first_token_s"]
    shown = "no token (see log_tail)" if seconds is None else f"{seconds:.1f} s"
    print(f"{label:>6}: process start -> first token {shown}", flush=True)
    for phases in trial["startup_phases_s"]:
        who, *timed = phases.items()
        shown = ", ".join(f"{k} {v:.2f} s" for k, v in timed)
        print(f"        {who[1]}: {shown}", flush=True)
    return trial


def import_cost() -> dict[str, Any]:
    """`python -X importtime` of what the offline LLM imports: the total, lanner's own
    modules' share, and whether any server-only package came along."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lanner.entrypoints.llm"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    own = total = 0
    packages: dict[str, int] = {}
    modules: set[str] = set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cumulative_us, raw_name = line[12:].split("|")
        if not self_us.strip().isdigit():
            continue  # the header line
        module = raw_name.strip()
        modules.add(module)
        if module.startswith("lanner"):
            own += int(self_us)
        if len(raw_name) - len(raw_name.lstrip()) == 1:  # the top-level import
            total += int(cumulative_us)
        if "." not in module and not module.startswith(("lanner", "_")):
            packages[module] = int(cumulative_us)  # a package, where first imported
    biggest = dict(sorted(packages.items(), key=lambda kv: -kv[1])[:8])
    server = sorted(
        {m for m in SERVER_MODULES for name in modules if name == m or name.startswith(m + ".")}
    )
    return {
        "total_s": total / 1e6,
        "lanner_own_modules_s": own / 1e6,
        "largest_packages_s": {k: v / 1e6 for k, v in biggest.items()},
        "server_only_packages_imported": server,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHAPE_8B if on_gpu else DEMO))
    parser.add_argument(
        "--engine-args",
        default=None,
        help="flags for lanner serve (default on CUDA: --load-format dummy --dtype bfloat16 "
        "--tokenizer <demo model> --max-model-len 8192; on the CPU: none)",
    )
    parser.add_argument("--warm-trials", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per trial")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    if args.commit:
        os.environ["LANNER_COMMIT"] = args.commit
    if args.engine_args is None:
        args.engine_args = (
            f"--load-format dummy --dtype bfloat16 --tokenizer {DEMO} --max-model-len 8192"
            if on_gpu
            else ""
        )
    args.engine_args = args.engine_args.split()

    imports = import_cost()
    print(
        f"offline imports: {imports['total_s']:.2f} s, lanner's own modules "
        f"{imports['lanner_own_modules_s']:.3f} s, server packages imported: "
        f"{imports['server_only_packages_imported'] or 'none'}"
    )
    trials = []
    with tempfile.TemporaryDirectory(prefix="lanner-cold-") as scratch:
        cache_dir = Path(scratch) / "triton-cache"
        cache_dir.mkdir()
        trials.append(serve_trial(args, cache_dir, "empty", Path(scratch)))
        for index in range(args.warm_trials):
            trials.append(serve_trial(args, cache_dir, f"warm{index + 1}", Path(scratch)))

    result = new_result("cold-start", Path(args.model).name)
    result.update(
        engine_args=args.engine_args,
        offline_imports=imports,
        trials=trials,
        torch=torch.__version__,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    save_copies(result, RESULTS, f"{stamp}-cold-start.json")
    print(f"wrote {RESULTS / f'{stamp}-cold-start.json'}")
    return 0 if all(t["process_start_to_first_token_s"] is not None for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
