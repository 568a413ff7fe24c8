"""`lanner serve --data-parallel-size 2` on the CPU: two engine cores behind one server.
Greedy outputs equal the offline LLM's, requests spread over both cores, a shared prefix
stays on one core, and when one core dies the other keeps serving."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from lanner import LLM, SamplingParams
from lanner.bench.server_metrics import scrape_metrics as scrape
from lanner.engine.async_llm import AsyncLLM
from lanner.engine.config import DEFAULT_MODEL_DIR, EngineConfig
from lanner.engine.core import EngineCoreStats
from lanner.engine.data_parallel import DataParallelAsyncLLM, core_environments, sum_stats
from tests.entrypoints.server_utils import ServerProcess

ENGINE = dict(max_model_len=512, num_gpu_blocks_override=128)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("dp_logs") / "server.log"
    args = ["--data-parallel-size", "2", "--max-model-len", "512",
            "--num-gpu-blocks-override", "128"]  # fmt: skip
    process = ServerProcess(DEFAULT_MODEL_DIR, args, log)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def per_engine(server: ServerProcess) -> dict[str, float]:
    counts: dict[str, float] = {}
    for name, value in scrape(server.url).items():
        if name.startswith("lanner:data_parallel_requests_total{"):
            engine = name.split("engine=", 1)[1].split(",", 1)[0]
            counts[engine] = counts.get(engine, 0.0) + value
    return counts


def complete(server: ServerProcess, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": "lanner-demo", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_the_data_parallel_engine_offers_what_the_server_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever AsyncLLM offers the server, the fan-out offers too (a new AsyncLLM method
    # that serving.py calls fails here until DataParallelAsyncLLM has it).
    public = {name for name in dir(AsyncLLM) if not name.startswith("_")}
    public |= {"tokenizer", "ready", "stats"}  # AsyncLLM's attributes serving.py reads
    missing = public - set(dir(DataParallelAsyncLLM))
    assert not missing, f"DataParallelAsyncLLM lacks {sorted(missing)} of AsyncLLM"
    total = sum_stats([EngineCoreStats(2, 1, 0.5, 10, 4), EngineCoreStats(1, 0, 0.25, 6, 6)])
    assert total == EngineCoreStats(3, 1, 0.375, 16, 10)
    cpu = EngineConfig.from_kwargs(device="cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert core_environments(cpu, 2) == [{"OMP_NUM_THREADS": threads}] * 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is left alone
    assert core_environments(cpu, 2) == [{}, {}]
    with pytest.raises(ValueError, match="pass --device cuda"):
        core_environments(EngineConfig.from_kwargs(device="cuda:1"), 2)


def test_serves_greedy_outputs_and_balances(server: ServerProcess) -> None:
    prompts = [f"def step_{i}(state):\n    # {i * 7}\n" for i in range(8)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the server's two cores: no spinning OpenMP threads
    try:
        offline = LLM(str(DEFAULT_MODEL_DIR), dtype="float32", device="cpu", block_size=4,
                      **ENGINE)  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    finally:
        torch.set_num_threads(threads)
    before = per_engine(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda p: complete(server, p), prompts)) == expected
    after = per_engine(server)
    spread = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert spread.get("0", 0) >= 2 and spread.get("1", 0) >= 2, spread
    # A shared prefix stays on the core that cached it.
    shared = "class Inventory:\n" + "    def count(self, item):\n        return 0\n" * 4
    homes = set()
    for i in range(4):
        before = per_engine(server)
        complete(server, shared + f"    # q{i}\n", max_tokens=4)
        after = per_engine(server)
        homes |= {e for e in after if after[e] > before.get(e, 0.0)}
    assert len(homes) == 1, homes
    home = homes.pop()
    hits = scrape(server.url)[
        f"lanner:data_parallel_requests_total{{engine={home},reason=prefix_hit}}"
    ]
    assert hits >= 3
    deadline = time.monotonic() + 10
    while scrape(server.url)["lanner:kv_cache_usage_perc{}"] != 0:  # both pools full again
        assert time.monotonic() < deadline
        time.sleep(0.05)


def core_pids(server: ServerProcess) -> list[int]:
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def test_one_dead_core_leaves_the_other_serving(server: ServerProcess) -> None:
    pids = core_pids(server)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    for i in range(4):  # every request goes to the live core
        assert complete(server, f"x = {i}\n", max_tokens=4)
    assert httpx.get(f"{server.url}/health").status_code == 200
