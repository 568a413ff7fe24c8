"""Cold start: how long a fresh process takes to serve its first token, with an empty and
with a warm Triton cache, and where the time goes; plus the offline path's import cost
(`python -X importtime`).

Three kinds of trial, each in a fresh process group with TRITON_CACHE_DIR and
LANNER_CACHE_DIR (remembered tokenizers) set (fresh folders for "empty"; the folders the
kind's empty trial filled for "warm"):

- engine: builds ``LLM(...)`` in-process after its imports and generates one token,
  recording every startup step as it ends (CUDA context, model build and dummy weights,
  profile run, KV cache, each CUDA graph's warm-up and capture, tokenizer) and every
  Triton kernel compiled or loaded from the cache (name, constexprs, seconds, the step
  it fell in), through Triton's JIT hooks; and how the kernels were had ahead
  (``kernels_ahead``: the kernel manifest the empty trial wrote, or the compile-only
  pass), whether the manifest was written, and whether the captures were redone.
- engine-serial: the same with LANNER_PARALLEL_COMPILE=0 (kernels compile one at a time
  as they first launch, not ahead on a pool of threads).
- engine-warm-no-tokenizer (--no-tokenizer-trial): one more warm engine trial with
  skip_tokenizer_init (the tokenizer otherwise loads on a thread beside the build).
- engine-empty-triton-only (--empty-triton-trial): an empty Triton cache beside the engine
  trials' lanner cache (a start after Triton's cache alone was emptied).
- engine-stale (--stale-trial): one more engine trial over the engine trials' cache,
  after dropping a kernel only the large decode graphs launch from its kernel manifest.
- serve: ``lanner serve`` sent one 1-token completion as soon as the port answers;
  process start -> first token, and the phases the engine core and the API server log.

On a GPU (defaults: the llama3-8b shape, random weights, bf16):
    PYTHONPATH=. python3 benchmarks/cold_start.py --commit $(git rev-parse --short HEAD)
On the CPU (defaults: the embedded demo model):
    PYTHONPATH=. .venv/bin/python benchmarks/cold_start.py --commit $(git rev-parse --short HEAD)

Every trial has a hard timeout (its process group is killed), and --budget bounds the
whole run; the JSON (benchmarks/results/<stamp>-cold-start.json and $OUT) is rewritten
after each trial and on SIGTERM, so a run cut short keeps what it saw: the steps reached,
the kernels compiled so far and the log's tail. Progress lines print as they happen.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "lanner" / "assets" / "demo-model"
SHAPE_8B = REPO / "benchmarks" / "shapes" / "llama3-8b"
# "startup: a 1.2 s, b 3.4 s" (the engine core's summary), "startup (server): ..." and
# "startup phase: name 1.23 s" (each engine core phase as it ends).
PHASES = re.compile(r"startup(?: \((\w+)\))?: (.*)$")
PHASE_DONE = re.compile(r"startup phase: (.*) ([\d.]+) s$")
PHASE_ITEMS = re.compile(r"(.+?) (\d+\.\d+) s(?:, |$)")
SERVER_MODULES = ("fastapi", "uvicorn", "zmq", "prometheus_client", "httpx", "msgspec")
SERVE_NEEDS = ("fastapi", "uvicorn", "zmq", "msgspec")  # without them no serve trial runs
GPU_ENGINE_ARGS = f"--load-format dummy --dtype bfloat16 --tokenizer {DEMO} --max-model-len 8192"
PROMPT = [1, 2, 3, 4]
# What --stale-trial drops from the kernel manifest: a kernel only the large decode
# graphs launch (cascade attention), so that only their captures miss it.
STALE_KERNELS = ("_cascade_prefix_kernel",)
# Each engine trial's greedy check after its first tokens: prompts x tokens.
CHECK_PROMPTS, CHECK_TOKENS = 8, 16
_STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[cold +{time.perf_counter() - _STARTED:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_kwargs(flags: list[str]) -> dict[str, Any]:
    """``--load-format dummy --max-model-len 8192`` as LLM keyword arguments (numbers as
    ints, a flag without a value as True)."""
    kwargs: dict[str, Any] = {}
    index = 0
    while index < len(flags):
        name = flags[index].removeprefix("--").replace("-", "_")
        value: Any = True
        if index + 1 < len(flags) and not flags[index + 1].startswith("--"):
            value = flags[index + 1]
            index += 1
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
            value = int(value)
        kwargs[name] = value
        index += 1
    return kwargs


# ----------------------------------------------------------------------------------------
# The parent: runs each trial in its own process group, with a hard timeout.


class Interrupted(Exception):
    """This run was stopped (SIGTERM, Ctrl-C) during a trial: what the trial saw."""

    def __init__(self, trial: dict) -> None:
        super().__init__(trial["label"])
        trial["interrupted"] = True
        self.trial = trial


class Child:
    """A trial's process: its own session (so the whole group can be killed), output into
    a log file whose new lines are echoed as progress."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, label: str):
        self.log_path = log_path
        self.label = label
        self._log = log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._stop = threading.Event()
        self._echo = threading.Thread(target=self._echo_lines, daemon=True)
        self._echo.start()

    def _echo_lines(self) -> None:
        with self.log_path.open("rb") as log:
            pending = b""
            while True:
                chunk = log.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        say(f"{self.label}| {line.decode(errors='replace')[:300]}")
                elif self._stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stop(self) -> int | None:
        """End the whole process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self._stop.set()
        self._echo.join(5)
        self._log.close()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def first_token(url: str, deadline: float, child: Child) -> float | None:
    """Poll with a 1-token completion until the server answers one; returns the time
    (perf_counter) it arrived, or None at the deadline or when the server exits."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    last_error = ""
    while time.perf_counter() < deadline and child.process.poll() is None:
        try:
            timeout = max(0.5, deadline - time.perf_counter())
            with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                if reply.status == 200 and json.loads(reply.read())["usage"]["completion_tokens"]:
                    return time.perf_counter()
        except urllib.error.HTTPError as err:  # the server answered, with an error
            error = f"HTTP {err.code}: {err.read()[:300]!r}"
            if error != last_error:
                say(f"{child.label}: the server answered {error}")
                last_error = error
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.05)
    return None


def parse_phases(log: str) -> dict[str, Any]:
    """The startup log's phases: every summary line ('startup[ (who)]: a 1.2 s, ...') as
    {"who": who, name: seconds}, and the engine core's phases as each ended."""
    summaries: list[dict[str, float | str]] = []
    reached: dict[str, float] = {}
    for line in log.splitlines():
        done = PHASE_DONE.search(line)
        if done:
            reached[done.group(1)] = float(done.group(2))
            continue
        match = PHASES.search(line)
        if match:
            summary: dict[str, float | str] = {"who": match.group(1) or "engine core"}
            # Names may hold ", " themselves: each ends at its " 1.23 s".
            for name, value in PHASE_ITEMS.findall(match.group(2)):
                summary[name] = float(value)
            summaries.append(summary)
    return {"summaries": summaries, "engine_core_phases_reached": reached}


def trial_env(cache_dir: Path, lanner_cache: Path | None = None) -> dict[str, str]:
    """A trial's environment: Triton's cache in ``cache_dir`` and lanner's own (remembered
    tokenizers) beside it (or ``lanner_cache``), so that an empty trial starts with both
    empty and the warm trials after it find what it left."""
    if lanner_cache is None:
        lanner_cache = cache_dir.with_name(cache_dir.name.replace("triton-cache", "lanner-cache"))
    return {
        **os.environ,
        "TRITON_CACHE_DIR": str(cache_dir),
        "LANNER_CACHE_DIR": str(lanner_cache),
        "PYTHONPATH": repo_first_pythonpath(),
    }


def repo_first_pythonpath() -> str:
    """This checkout first, then the caller's PYTHONPATH (packages carried beside the
    machine's own, e.g. the server's on the GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def count_cache_entries(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache folder (one subfolder per kernel binary)."""
    return sum(1 for entry in cache_dir.iterdir() if entry.is_dir()) if cache_dir.exists() else 0


def manifest_variants(cache_dir: Path) -> dict[str, int]:
    """Each kernel manifest in a Triton cache folder: its number of variants."""
    counts = {}
    for path in sorted(cache_dir.glob("lanner-startup-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            counts[path.name] = len(json.loads(path.read_text())["variants"])
    return counts


def make_manifests_stale(cache_dir: Path, kernels: tuple[str, ...]) -> int:
    """Drop ``kernels``' variants from every kernel manifest in the folder, as a manifest
    written before a code change that added them would lack them; the variants dropped."""
    dropped = 0
    for path in cache_dir.glob("lanner-startup-*.json"):
        data = json.loads(path.read_text())
        kept = [v for v in data["variants"] if v["qualname"] not in kernels]
        dropped += len(data["variants"]) - len(kept)
        path.write_text(json.dumps({**data, "variants": kept}))
    return dropped


def serve_trial(args: argparse.Namespace, cache_dir: Path, label: str, scratch: Path) -> dict:
    port = free_port()
    command = [
        sys.executable, "-m", "lanner.entrypoints.cli", "serve", args.model,
        "--host", "127.0.0.1", "--port", str(port), *args.engine_args,
    ]  # fmt: skip
    env = trial_env(cache_dir)
    timeout = args.trial_timeout_for()
    say(f"{label}: lanner serve (timeout {timeout:.0f} s)")
    child = Child(command, env, scratch / f"{label}.log", label)
    arrived = None
    interrupted = False
    try:
        arrived = first_token(f"http://127.0.0.1:{port}", child.started + timeout, child)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        returncode = child.stop()
    log_text = child.log_path.read_text(errors="replace")
    seconds = None if arrived is None else arrived - child.started
    trial = {
        "kind": "serve",
        "label": label,
        "timeout_s": timeout,
        "process_start_to_first_token_s": seconds,
        "timed_out": arrived is None and returncode in (None, -signal.SIGTERM, -signal.SIGKILL),
        "returncode": returncode,
        "elapsed_s": child.elapsed(),
        "triton_cache_entries_after": count_cache_entries(cache_dir),
        "startup_phases_s": parse_phases(log_text),
        "log_tail": log_text[-4000:] if arrived is None else log_text[-1500:],
    }
    shown = "no token (see log_tail)" if seconds is None else f"{seconds:.1f} s"
    say(f"{label}: process start -> first token {shown}")
    if interrupted:
        raise Interrupted(trial)
    return trial


def engine_trial(
    args: argparse.Namespace,
    cache_dir: Path,
    label: str,
    scratch: Path,
    serial: bool = False,
    lanner_cache: Path | None = None,
) -> dict:
    """``serial``: with LANNER_PARALLEL_COMPILE=0 (each kernel compiles as it first launches);
    ``lanner_cache``: lanner's cache folder (default: beside ``cache_dir``)."""
    events_path = scratch / f"{label}.events.jsonl"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--engine-child", str(events_path),
        "--model", args.model, f"--engine-args={' '.join(args.engine_args)}",
    ]  # fmt: skip
    env = trial_env(cache_dir, lanner_cache)
    if serial:
        env["LANNER_PARALLEL_COMPILE"] = "0"
    timeout = args.trial_timeout_for()
    say(f"{label}: LLM(...) in a fresh process (timeout {timeout:.0f} s)")
    child = Child(command, env, scratch / f"{label}.log", label)
    interrupted = False
    try:
        child.process.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{label}: timed out after {timeout:.0f} s; killing its process group")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        returncode = child.stop()
    events = []
    if events_path.exists():
        for line in events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
                events.append(json.loads(line))
    trial = summarize_engine_events(events)
    trial.update(
        kind="engine",
        label=label,
        timeout_s=timeout,
        returncode=returncode,
        timed_out=returncode in (-signal.SIGTERM, -signal.SIGKILL),
        elapsed_s=child.elapsed(),
        triton_cache_entries_after=count_cache_entries(cache_dir),
        manifest_variants_after=manifest_variants(cache_dir),
        capture_fallback="capturing without warm-ups failed" in child.log_path.read_text(),
        log_tail=child.log_tail(4000 if returncode else 1500),
    )
    for line in engine_summary_lines(trial):
        say(f"{label}: {line}")
    if interrupted:
        raise Interrupted(trial)
    return trial


def summarize_engine_events(events: list[dict]) -> dict[str, Any]:
    """An engine trial's events as steps (in the order they ended), the kernels compiled
    (per kernel and per step) and the headline times."""
    steps = [e for e in events if e["event"] == "step"]
    compiles = [e for e in events if e["event"] == "compile"]
    marks = {e["name"]: e for e in events if e["event"] == "mark"}
    per_kernel: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"count": 0, "seconds": 0.0}
    )
    per_step: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"count": 0, "seconds": 0.0}
    )
    for entry in compiles:
        for table, key in ((per_kernel, entry["kernel"]), (per_step, entry["step"])):
            table[key]["count"] += 1
            table[key]["seconds"] += entry["seconds"]
    summary: dict[str, Any] = {
        "imports_s": marks.get("imports", {}).get("process_age_s"),
        "engine_build_s": marks.get("engine built", {}).get("since_imports_s"),
        "first_token_after_imports_s": marks.get("first token", {}).get("since_imports_s"),
        "process_start_to_first_token_s": marks.get("first token", {}).get("process_age_s"),
        "reached": events[-1]["event"] + ": " + events[-1].get("name", "") if events else None,
        "num_kernel_compiles_or_loads": len(compiles),
        "kernel_compile_or_load_s": sum(e["seconds"] for e in compiles),
        "compiles_per_kernel": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["seconds"])),
        "compiles_per_step": dict(per_step),
        # How the startup's kernels were had: the kernel manifest's variants loaded on the
        # pool, or the compile-only pass over the startup's steps.
        "kernels_ahead": (
            "kernel manifest"
            if any(s["name"] == "load manifest variants" for s in steps)
            else "compile-only pass"
            if any(s["name"].startswith("graph compile-only") for s in steps)
            else None
        ),
        "manifest_written": any(s["name"] == "write kernel manifest" for s in steps),
        "greedy_token_ids": next((e["token_ids"] for e in events if e["event"] == "greedy"), None),
        "steps": steps,
        "compiles": compiles,
    }
    return summary


def engine_summary_lines(trial: dict) -> list[str]:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    lines = [
        f"imports {fmt(trial['imports_s'])}, engine build {fmt(trial['engine_build_s'])}, "
        f"first token after imports {fmt(trial['first_token_after_imports_s'])}, process "
        f"start -> first token {fmt(trial['process_start_to_first_token_s'])}; last event "
        f"{trial['reached']}",
        f"kernels ahead: {trial.get('kernels_ahead')}; kernel manifest written: "
        f"{trial.get('manifest_written')}; captures redone with warm-ups: "
        f"{trial.get('capture_fallback')}",
        f"{trial['num_kernel_compiles_or_loads']} Triton kernel compiles/loads, "
        f"{trial['kernel_compile_or_load_s']:.1f} s in all (each from its hand-over to ready: "
        f"compiled ahead on a pool, they overlap)",
    ]
    for name, entry in list(trial["compiles_per_kernel"].items())[:12]:
        lines.append(f"  {name}: {entry['count']} x, {entry['seconds']:.2f} s")
    top = [s for s in trial["steps"] if not s["name"].startswith("graph ")]
    graphs = [s for s in trial["steps"] if s["name"].startswith("graph ")]
    for step in top:
        lines.append(f"  step {step['name']}: {step['seconds']:.2f} s")
    if graphs:
        lines.append(
            f"  {len(graphs)} graph forwards: {sum(s['seconds'] for s in graphs):.2f} s, "
            f"slowest {max(graphs, key=lambda s: s['seconds'])['name']} "
            f"{max(s['seconds'] for s in graphs):.2f} s"
        )
    return lines


def import_cost(timeout: float) -> dict[str, Any]:
    """`python -X importtime` of what the offline LLM imports: the total, lanner's own
    modules' share, the largest packages, and whether any server-only package came along."""
    try:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "from lanner import LLM"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": repo_first_pythonpath()},
            check=True,
            timeout=timeout,
        )
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as err:
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return parse_importtime(done.stderr)


def parse_importtime(stderr: str) -> dict[str, Any]:
    own = total = 0
    packages: dict[str, int] = {}
    modules: set[str] = set()
    self_times: dict[str, int] = {}
    lanner_cumulative: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cumulative_us, raw_name = line[12:].split("|")
        if not self_us.strip().isdigit():
            continue  # the header line
        module = raw_name.strip()
        modules.add(module)
        self_times[module] = int(self_us)
        if module.startswith("lanner"):
            own += int(self_us)
            lanner_cumulative[module] = int(cumulative_us)
        if len(raw_name) - len(raw_name.lstrip()) == 1:  # a top-level import
            total += int(cumulative_us)
        if "." not in module and not module.startswith(("lanner", "_")):
            packages[module] = int(cumulative_us)  # a package, where first imported

    def largest(table: dict[str, int], count: int) -> dict[str, float]:
        return {k: v / 1e6 for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:count]}

    server = sorted(
        {m for m in SERVER_MODULES for name in modules if name == m or name.startswith(m + ".")}
    )
    return {
        "total_s": total / 1e6,
        "lanner_own_modules_s": own / 1e6,
        "largest_packages_s": largest(packages, 12),
        "largest_modules_self_s": largest(self_times, 25),
        "lanner_modules_cumulative_s": largest(lanner_cumulative, 12),
        "server_only_packages_imported": server,
        "num_modules": len(modules),
    }


# ----------------------------------------------------------------------------------------
# The engine child: LLM(...) in this process, every step and Triton compile recorded.


class EventLog:
    """Appends one JSON line per event (flushed: a killed process keeps what it wrote)
    and prints a progress line for the ones worth reading live."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a")
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._threads = threading.local()

    @property
    def stack(self) -> list[str]:
        """This thread's steps now running, outermost first (the tokenizer loads on a
        thread of its own)."""
        if not hasattr(self._threads, "stack"):
            self._threads.stack = []
        return self._threads.stack

    def write(self, event: dict[str, Any], show: str | None = None) -> None:
        event["t_s"] = round(time.perf_counter() - self.started, 4)
        with self._lock:
            self.file.write(json.dumps(event, default=str) + "\n")
            self.file.flush()
        if show:
            print(f"[engine +{event['t_s']:6.2f}s] {show}", flush=True)

    def step(self, name: str) -> Any:
        log = self

        class _Step:
            def __enter__(self) -> None:
                log.stack.append(name)
                self.began = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                seconds = time.perf_counter() - self.began
                log.stack.pop()
                quiet = name.startswith("graph ")
                log.write(
                    {"event": "step", "name": name, "seconds": seconds, "within": list(log.stack)},
                    None if quiet else f"{name}: {seconds:.2f} s",
                )

        return _Step()


def timed(log: EventLog, owner: Any, attribute: str, name: Any) -> None:
    """Wrap ``owner.attribute`` so that each call is a step; ``name`` is the step's name,
    or a function of the call's arguments giving it."""
    original = getattr(owner, attribute)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        label = name(*args, **kwargs) if callable(name) else name
        with log.step(label):
            return original(*args, **kwargs)

    setattr(owner, attribute, wrapper)


def watch_triton(log: EventLog) -> None:
    """Record every Triton kernel compiled or loaded from the on-disk cache (Triton calls
    these hooks around each in-memory cache miss): its name, constexprs and launch
    options, its seconds, and the step it fell in."""
    from triton import knobs

    began: dict[int, float] = {}

    def before(**info: Any) -> None:
        began[id(info["key"])] = time.perf_counter()
        return None  # a true value would skip the compile

    def after(**info: Any) -> None:
        seconds = time.perf_counter() - began.pop(id(info["key"]), time.perf_counter())
        jit = info["fn"].jit_function
        compile_info = info["compile"]
        names = list(jit.arg_names)

        def named(path: Any) -> str:
            return names[path[0]] if isinstance(path, tuple) and path else str(path)

        constants = {named(k): v for k, v in compile_info["constants"].items()}
        divisible = sorted(named(k) for k in (compile_info["configs"] or [{}])[0])
        kernel = info["fn"].name
        log.write(
            {
                "event": "compile",
                "kernel": kernel,
                "seconds": seconds,
                "step": " > ".join(log.stack) or "(none)",
                "constants": constants,
                "divisible_by_16": divisible,
                "num_warps": compile_info["num_warps"],
                "num_stages": compile_info["num_stages"],
            },
            f"compiled {kernel} in {seconds:.2f} s ({log.stack[-1] if log.stack else '-'})",
        )

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after


def triton_key_step(wait: bool = False) -> str:
    """The step name of a ``parallel_compile.warm_triton_key`` call: the engine starts
    Triton's self-hash on a thread, the first compile pool waits for it."""
    return "wait for Triton's key" if wait else "start Triton's key (thread)"


def engine_child(events_path: Path, model: str, flags: list[str]) -> int:
    import logging

    from lanner.engine.startup import seconds_since_process_start

    log = EventLog(events_path)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lanner import LLM, SamplingParams  # the offline path's imports

    age = seconds_since_process_start()
    after_imports = time.perf_counter()
    log.write({"event": "mark", "name": "imports", "process_age_s": age}, f"imports done {age} s")

    def since_imports() -> float:
        return time.perf_counter() - after_imports

    import gc
    import types

    import torch

    import lanner.engine.core as core
    import lanner.engine.llm_engine as llm_engine
    import lanner.kernels.kernel_manifest as kernel_manifest
    import lanner.kernels.parallel_compile as parallel_compile
    import lanner.model.loader as loader
    import lanner.runner.cuda_graphs as cuda_graphs
    import lanner.runner.model_runner as model_runner

    watch_triton(log)
    timed(log, core, "load_model", "load model (build + weights)")
    timed(log, loader, "dummy_init", "dummy weights")
    timed(log, loader, "assign_linear_methods", "allocate linear weights")
    timed(log, loader, "resolve_model_path", "find the checkpoint")
    timed(log, loader.ModelConfig, "from_pretrained", "read config.json")
    find_class = loader.get_model_class

    def timed_model_class(config: Any) -> Any:
        model_class = find_class(config)

        def build(*args: Any, **kwargs: Any) -> Any:
            with log.step("build modules"):
                return model_class(*args, **kwargs)

        return build

    loader.get_model_class = timed_model_class
    timed(log, loader, "process_weights_after_loading", "process weights after loading")
    timed(log, core, "StructuredOutputManager", "structured-output manager")
    timed(log, model_runner.ModelRunner, "_precompile_kernels", "parallel kernel compile")
    # Within it, on a warm start: the variants the kernel manifest lists, loaded on the
    # pool (no compile-only pass); and after the captures, the manifest written (a start
    # that compiled something the manifest lacked).
    timed(log, parallel_compile, "load_variants", "load manifest variants")
    timed(log, kernel_manifest, "write", "write kernel manifest")
    timed(log, parallel_compile, "warm_triton_key", triton_key_step)
    timed(log, model_runner.ModelRunner, "profile_peak_memory", "profile run")
    timed(log, model_runner, "allocate_kv_caches", "allocate KV caches")
    timed(log, model_runner.ModelRunner, "initialize_cache", "KV cache + CUDA graphs")
    timed(log, cuda_graphs.DecodeGraphs, "capture", "CUDA graph capture")
    timed(log, llm_engine, "load_tokenizer", "load tokenizer")
    timed(log, llm_engine, "checked_generation_defaults", "generation defaults")
    core.gc = types.SimpleNamespace(collect=gc.collect, freeze=gc.freeze)
    timed(log, core.gc, "collect", "gc.collect at engine ready")

    def graph_forward_name(graphs: Any, batch: int) -> str:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        ahead = "parallel kernel compile" in log.stack  # the compile-only pass
        kind = "capture" if capturing else "compile-only" if ahead else "warm-up"
        return f"graph {kind} batch {batch}"

    timed(log, cuda_graphs.DecodeGraphs, "_forward", graph_forward_name)
    kwargs = engine_kwargs(flags)
    if torch.cuda.is_available():
        with log.step("CUDA context"):
            torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
    with log.step("LLM(...)"):
        llm = LLM(model, **kwargs)
    log.write({"event": "mark", "name": "engine built", "since_imports_s": since_imports()})
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    with log.step("first generate (1 token)"):
        outputs = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 1
    log.write(
        {
            "event": "mark",
            "name": "first token",
            "since_imports_s": since_imports(),
            "process_age_s": seconds_since_process_start(),
        },
        f"first token {since_imports():.2f} s after imports",
    )
    with log.step("second generate (1 token)"):
        llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)
    # After the timed part: greedy tokens of a few prompts decoded through the captured
    # graphs, which every trial (however it had its kernels) must produce alike.
    prompts = [{"prompt_token_ids": [1 + i, 7 * i + 2, 3, 4 + i]} for i in range(CHECK_PROMPTS)]
    check = SamplingParams(max_tokens=CHECK_TOKENS, temperature=0.0, ignore_eos=True)
    with log.step("check generate"):
        outputs = llm.generate(prompts, check, use_tqdm=False)
    log.write({"event": "greedy", "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
    log.write({"event": "mark", "name": "done"})
    return 0


# ----------------------------------------------------------------------------------------


def run_trials(
    args: argparse.Namespace,
    kinds: list[str],
    scratch: Path,
    deadline: float,
    result: dict[str, Any],
    save: Any,
) -> None:
    """Each kind's empty trial, then its warm ones (the cache the empty one filled)."""
    for kind in kinds:
        missing = [m for m in SERVE_NEEDS if importlib.util.find_spec(m) is None]
        if kind == "serve" and missing:
            say(f"serve trials skipped: this Python lacks the server's packages {missing}")
            result["trials"].append({"kind": "serve", "skipped": f"missing {missing}"})
            continue
        cache_dir = scratch / f"triton-cache-{kind}"
        cache_dir.mkdir()
        run = {
            "engine": engine_trial,
            "engine-serial": functools.partial(engine_trial, serial=True),
            "serve": serve_trial,
        }[kind]
        # engine-serial differs from engine only while compiling: its empty trial alone.
        for index in range(1 + (0 if kind == "engine-serial" else args.warm_trials)):
            if deadline - time.perf_counter() < 5:
                say(f"budget spent: skipping the rest from {kind} trial {index}")
                break
            label = f"{kind}-{'empty' if index == 0 else f'warm{index}'}"
            result["trials"].append(run(args, cache_dir, label, scratch))
            save()
        if kind == "engine" and args.no_tokenizer_trial and deadline - time.perf_counter() >= 5:
            # The same warm start without the tokenizer, which otherwise loads on a thread
            # beside the engine's build and shares the GIL with it: what it costs.
            plain = args.engine_args
            args.engine_args = [*plain, "--skip-tokenizer-init"]
            try:
                trial = engine_trial(args, cache_dir, "engine-warm-no-tokenizer", scratch)
            finally:
                args.engine_args = plain
            result["trials"].append(trial)
            save()
        if kind == "engine" and args.empty_triton_trial and deadline - time.perf_counter() >= 5:
            # An empty Triton cache beside a warm lanner cache (the tokenizer remembered):
            # a start after Triton's cache was cleared, or after a Triton upgrade.
            fresh = scratch / "triton-cache-engine-only-empty"
            fresh.mkdir()
            lanner_cache = trial_env(cache_dir)["LANNER_CACHE_DIR"]
            result["trials"].append(
                engine_trial(
                    args,
                    fresh,
                    "engine-empty-triton-only",
                    scratch,
                    lanner_cache=Path(lanner_cache),
                )
            )
            save()
        if kind == "engine" and args.stale_trial and deadline - time.perf_counter() >= 5:
            # A manifest that lacks variants the graph captures need (cascade attention's
            # runs only in the large graphs): the captures must refuse to compile, be
            # redone with warm-ups, and the manifest be written whole again.
            dropped = make_manifests_stale(cache_dir, STALE_KERNELS)
            say(f"engine-stale: dropped {dropped} variants of {STALE_KERNELS} from the manifest")
            trial = engine_trial(args, cache_dir, "engine-stale", scratch)
            trial["variants_dropped"] = dropped
            result["trials"].append(trial)
            save()


def keep_logs(scratch: Path, name: str) -> None:
    """Copy every trial's whole log to $OUT/<name>-logs/ (when $OUT is set); its events
    are in the JSON (its steps and compiles), and few files come back from a GPU run."""
    if not os.environ.get("OUT"):
        return
    folder = Path(os.environ["OUT"]) / name.replace(".json", "-logs")
    folder.mkdir(parents=True, exist_ok=True)
    for path in scratch.iterdir():
        if path.is_file() and path.suffix == ".log":
            (folder / path.name).write_bytes(path.read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the 8B shape on CUDA, else demo")
    parser.add_argument(
        "--engine-args",
        default=None,
        help=f"flags for lanner serve, also read as LLM keyword arguments (default on CUDA: "
        f"{GPU_ENGINE_ARGS.replace(str(DEMO), '<demo model>')}; on the CPU: none)",
    )
    parser.add_argument(
        "--kinds",
        default="engine,serve",
        help="trial kinds, in order: engine, engine-serial (LANNER_PARALLEL_COMPILE=0), serve",
    )
    parser.add_argument("--warm-trials", type=int, default=1, help="warm trials per kind")
    parser.add_argument(
        "--no-tokenizer-trial",
        action="store_true",
        help="after the engine trials, one more warm one with skip_tokenizer_init (what the "
        "tokenizer's load on a thread beside the build costs the build)",
    )
    parser.add_argument(
        "--empty-triton-trial",
        action="store_true",
        help="after the engine trials, one more with an empty Triton cache but the lanner "
        "cache (remembered tokenizer) the engine trials filled",
    )
    parser.add_argument(
        "--stale-trial",
        action="store_true",
        help="after the engine trials, one more with their kernel manifest stripped of "
        f"{', '.join(STALE_KERNELS)} (a stale manifest)",
    )
    parser.add_argument("--trial-timeout", type=float, default=120.0, help="seconds per trial")
    parser.add_argument(
        "--budget", type=float, default=600.0, help="seconds for the whole run (trials cut to fit)"
    )
    parser.add_argument("--skip-importtime", action="store_true")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--engine-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_child:
        return engine_child(Path(args.engine_child), args.model, args.engine_args.split())

    import torch

    from lanner.bench.report import new_result, save_copies

    on_gpu = torch.cuda.is_available()
    if args.commit:
        os.environ["LANNER_COMMIT"] = args.commit
    args.model = args.model or str(SHAPE_8B if on_gpu else DEMO)
    if args.engine_args is None:
        args.engine_args = GPU_ENGINE_ARGS if on_gpu else ""
    args.engine_args = args.engine_args.split()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(kinds) - {"engine", "engine-serial", "serve"}:
        parser.error(f"--kinds takes engine, engine-serial and serve, got {args.kinds!r}")
    deadline = _STARTED + args.budget

    def trial_timeout_for() -> float:
        return max(1.0, min(args.trial_timeout, deadline - time.perf_counter()))

    args.trial_timeout_for = trial_timeout_for

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-cold-start.json"
    result = new_result("cold-start", Path(args.model).name)
    result.update(
        engine_args=args.engine_args,
        torch=torch.__version__,
        complete=False,
        offline_imports=None,
        trials=[],
    )

    def save() -> None:
        save_copies(result, RESULTS, name)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    save()
    try:
        if not args.skip_importtime:
            imports = import_cost(min(60.0, trial_timeout_for()))
            result["offline_imports"] = imports
            say(f"offline imports (python -X importtime, `from lanner import LLM`): {imports}")
            save()
        with tempfile.TemporaryDirectory(prefix="lanner-cold-") as scratch_name:
            scratch = Path(scratch_name)
            try:
                run_trials(args, kinds, scratch, deadline, result, save)
            finally:
                keep_logs(scratch, name)
        result["complete"] = True
    except Interrupted as stop:
        result["trials"].append(stop.trial)
        say(f"stopped during {stop.trial['label']}; the JSON keeps what it saw")
    except KeyboardInterrupt as stop:
        say(f"stopped ({stop}); the JSON keeps the trials done")
    finally:
        greedy = {
            t["label"]: t["greedy_token_ids"] for t in result["trials"] if t.get("greedy_token_ids")
        }
        result["greedy_outputs_equal"] = len({json.dumps(g) for g in greedy.values()}) <= 1
        say(
            f"greedy check tokens equal across trials {sorted(greedy)}: "
            f"{result['greedy_outputs_equal']}"
        )
        save()
        say(f"wrote {RESULTS / name}" + (f" and $OUT/{name}" if os.environ.get("OUT") else ""))
    ran = [t for t in result["trials"] if not t.get("skipped")]
    done = bool(ran) and all(t.get("process_start_to_first_token_s") is not None for t in ran)
    return 0 if done and result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
