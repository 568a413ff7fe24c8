"""Regenerates the outputs README.md shows, by running what it shows: each block between
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` is replaced by what its
command prints now, on this machine. tests/test_readme.py checks the blocks still agree
with the engine, so a change that alters an output fails CI until this is re-run.

    .venv/bin/python scripts/update_readme.py              # every block (starts a server)
    .venv/bin/python scripts/update_readme.py --only demo,offline
    .venv/bin/python scripts/update_readme.py --time-tests # also times the test suite

Blocks: demo (scripts/run_demo.sh), offline (the sampled generate example), serve (the
openai client example against `lanner serve`), curl (the curl session), tests (the test
command's duration; only with --time-tests, otherwise left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON = sys.executable
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# What the README shows being run, kept here once: the test runs the same.
OFFLINE_PROMPTS = ["import os\n\ndef list_files(path):", "class Stack:"]
OFFLINE_PARAMS = dict(temperature=0.8, top_p=0.95, max_tokens=40, seed=0)
SERVE_COMPLETION = dict(prompt="def fibonacci(n):", max_tokens=32, temperature=0)
SERVE_CHAT = dict(
    messages=[{"role": "user", "content": "Write a function that reverses a list."}],
    max_tokens=40,
    temperature=0,
)
CURL_COMPLETION = {
    "model": "lanner-demo",
    "prompt": "import os\n\ndef list_files(path):",
    "max_tokens": 16,
    "temperature": 0,
}
CURL_ERROR = {"model": "lanner-demo", "prompt": "x", "top_p": 2}


def fenced(language: str, text: str) -> str:
    return f"```{language}\n{text.rstrip()}\n```\n"


def run_demo() -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_demo.sh")],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    return fenced("text", done.stdout.rstrip("\n") + "\n" + done.stderr.strip().splitlines()[-1])


def offline_lines() -> list[str]:
    """The sampled example's output lines (used by the test too)."""
    from lanner import LLM, SamplingParams

    outputs = LLM().generate(OFFLINE_PROMPTS, SamplingParams(**OFFLINE_PARAMS))
    return [f"{o.outputs[0].text!r} {o.outputs[0].finish_reason}" for o in outputs]


def run_offline() -> str:
    return fenced("text", "\n".join(offline_lines()))


class Server:
    """`lanner serve` with the demo model on a free port, for the serve and curl blocks."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "lanner.entrypoints.cli", "--log-level", "WARNING", "serve",
             "--port", str(self.port), "--uvicorn-log-level", "warning"],
            env=ENV,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("lanner serve did not come up")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(60)


def run_serve(server: Server) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.completions.create(model="lanner-demo", **SERVE_COMPLETION)
    lines = [f"{completion.choices[0].text!r} {completion.choices[0].finish_reason}"]
    stream = client.chat.completions.create(model="lanner-demo", stream=True, **SERVE_CHAT)
    lines.append("".join(chunk.choices[0].delta.content or "" for chunk in stream))
    return fenced("text", "\n".join(lines))


def run_curl(server: Server) -> str:
    session = []
    for body in (CURL_COMPLETION, CURL_ERROR):
        shown = json.dumps(body).replace("\n", "\\n")
        url = f"{server.url}/v1/completions"
        reply = subprocess.run(
            ["curl", "-s", url, "-H", "Content-Type: application/json", "-d", json.dumps(body)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        session.append(
            f'$ curl -s http://127.0.0.1:8000/v1/completions -H "Content-Type: '
            f'application/json" \\\n    -d {shlex.quote(shown)}\n{reply}'
        )
    return fenced("console", "\n".join(session))


def run_tests() -> str:
    started = time.perf_counter()
    # One thread a process, as on a shared machine; the suite's result is printed above.
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), "-q"], env=env, check=False)
    minutes = (time.perf_counter() - started) / 60
    load = os.getloadavg()[0]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return (
        f"The whole suite took {minutes:.1f} min on this {os.cpu_count()}-core machine with "
        f"`OMP_NUM_THREADS=1` (load average {load:.1f} at the end; commit {commit}); CI "
        "allows 90.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated block names")
    parser.add_argument("--time-tests", action="store_true", help="also time the test suite")
    args = parser.parse_args(argv)
    text = README.read_text()
    present = {match.group(2) for match in BLOCK.finditer(text)}
    wanted = set(args.only.split(",")) if args.only else set(present)
    if not args.time_tests:
        wanted.discard("tests")
    unknown = wanted - present
    if unknown:
        raise SystemExit(f"README.md has no generated blocks {sorted(unknown)}")
    server = Server() if wanted & {"serve", "curl"} else None
    makers: dict[str, Callable[[], str]] = {
        "demo": run_demo,
        "offline": run_offline,
        "tests": run_tests,
        "serve": lambda: run_serve(server),  # type: ignore[arg-type]
        "curl": lambda: run_curl(server),  # type: ignore[arg-type]
    }
    blocks: dict[str, str] = {}
    try:
        if server is not None:
            server.wait_ready()
        for name in sorted(wanted):
            print(f"running {name} ...", flush=True)
            blocks[name] = makers[name]()
    finally:
        if server is not None:
            server.stop()

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        body = blocks.get(name, match.group(3))
        return match.group(1) + body + match.group(4)

    README.write_text(BLOCK.sub(replace, text))
    print(f"updated {sorted(blocks)} in {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
