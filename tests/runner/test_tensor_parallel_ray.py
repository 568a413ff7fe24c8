"""The ray executor on a local Ray cluster of two nodes (one CPU each, started with Ray's
test utilities): TP=2 puts its worker on the other node than rank 0 and gives TP=1's
greedy tokens; a killed worker is reported at once, not waited on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanner import SamplingParams
from lanner.entrypoints.llm import LLM
from lanner.runner.executor import WorkerFailedError

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 22, block_size=4)
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 9]}, {"prompt_token_ids": list(range(30, 49))}]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[object]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_tensor_parallel_across_two_nodes(
    two_node_cluster: object, tiny_model_dirs: dict[str, Path], monkeypatch
) -> None:
    """Also: NCCL's settings in rank 0's environment reach the actors (a Ray worker's own
    environment is its node's)."""
    model_dir = str(tiny_model_dirs["mistral"])
    reference = LLM(model_dir, **ENGINE)
    expected = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, PARAMS)]
    reference.engine.core.shutdown()

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    try:
        executor = llm.engine.core.executor
        # The actor runs its worker (it answers no calls): read its environment from /proc.
        environment = Path(f"/proc/{executor.pids[1]}/environ").read_bytes().split(b"\0")
        assert b"NCCL_NVLS_ENABLE=0" in environment
        from ray.util.placement_group import placement_group_table

        nodes = placement_group_table(executor.placement)["bundles_to_node_id"]
        assert nodes[executor.rank0_bundle] == ray.get_runtime_context().get_node_id()
        [worker_bundle] = executor.worker_bundles
        assert nodes[worker_bundle] != nodes[executor.rank0_bundle]  # one rank per node

        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected

        os.kill(executor.pids[1], signal.SIGKILL)
        started = time.monotonic()
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        with pytest.raises(WorkerFailedError, match="worker 1"):
            llm.generate(PROMPTS[:1], long, use_tqdm=False)
        assert time.monotonic() - started < 15
    finally:
        llm.engine.core.shutdown()
