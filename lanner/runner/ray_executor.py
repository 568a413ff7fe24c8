"""The ray executor: tensor-parallel workers as Ray actors on an existing Ray cluster, one
per bundle of a placement group (a GPU each, or a CPU on a cluster without GPUs). Rank 0
is the engine core itself, so one bundle must lie on the node it runs on; the other
ranks' bundles may lie on any node. Only this module imports ray."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import torch

from lanner.runner.executor import ParallelConfig, TensorParallelExecutor
from lanner.runner.worker import Rendezvous, WorkerSpec, run_worker

logger = logging.getLogger(__name__)

# How long the cluster may take to grant the placement group.
PLACEMENT_TIMEOUT_S = 120.0
# Set in rank 0's environment, these reach the actors too (a Ray worker's environment is
# its node's, not the driver's): NCCL and NVSHMEM settings, such as multicast kept off.
FORWARDED_ENV_PREFIXES = ("NCCL_", "NVSHMEM_", "TORCH_SYMM_MEM_", "LANNER_")


class RayWorker:
    """The actor of one worker: ``run`` is its whole life (it returns at shutdown)."""

    def run(self, spec: WorkerSpec, rank: int, rendezvous: Rendezvous) -> None:
        import ray

        # gloo's connections to this rank go to this node's address.
        here = dataclasses.replace(rendezvous, hostname=ray.util.get_node_ip_address())
        run_worker(spec, rank, here)

    def gpu_ids(self) -> list[Any]:
        import ray

        return list(ray.get_gpu_ids())


class RayExecutor(TensorParallelExecutor):
    def __init__(self, config: ParallelConfig, spec: WorkerSpec) -> None:
        try:
            import ray
        except ImportError as err:
            raise ValueError(
                "distributed_executor_backend='ray' needs ray (pip install ray), and a Ray "
                "cluster (ray start --head, then ray start --address on the other nodes)"
            ) from err
        from ray.util.placement_group import placement_group, placement_group_table

        self.ray = ray
        if not ray.is_initialized():
            # An existing cluster: RAY_ADDRESS, or the one this node belongs to.
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        world = config.tensor_parallel_size
        device = spec.load_options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.uses_gpus = str(device).startswith("cuda")
        bundle = {"GPU": 1.0} if self.uses_gpus else {"CPU": 1.0}
        self.placement = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        try:
            ray.get(self.placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - GetTimeoutError, or the group failed
            ray.util.remove_placement_group(self.placement)
            raise ValueError(
                f"the Ray cluster did not grant {world} bundles of {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f}s (it has {ray.cluster_resources()}, free "
                f"{ray.available_resources()}): {err}"
            ) from None
        nodes = placement_group_table(self.placement)["bundles_to_node_id"]
        here = ray.get_runtime_context().get_node_id()
        local = [index for index, node in nodes.items() if node == here]
        if not local:
            ray.util.remove_placement_group(self.placement)
            raise ValueError(
                f"no bundle of the placement group lies on this node ({here}), where rank 0 "
                f"runs; give this node a free {'GPU' if self.uses_gpus else 'CPU'} in the "
                f"Ray cluster"
            )
        self.rank0_bundle = local[0]
        self.worker_bundles = [index for index in sorted(nodes) if index != self.rank0_bundle]
        self.actors: dict[int, Any] = {}
        self.runs: dict[int, Any] = {}
        # On GPUs, an actor holds rank 0's bundle, so Ray gives no one else its GPU, and
        # says which GPU that is.
        self.holder = None
        if self.uses_gpus:
            self.holder = self._actor(self.rank0_bundle)
        super().__init__(config, spec)

    def _actor(self, bundle_index: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=bundle_index
        )
        actor_class = self.ray.remote(RayWorker)
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        options: dict[str, Any] = {"runtime_env": {"env_vars": forwarded}} if forwarded else {}
        return actor_class.options(
            num_cpus=0 if self.uses_gpus else 1,
            num_gpus=1 if self.uses_gpus else 0,
            scheduling_strategy=strategy,
            **options,
        ).remote()

    def host_address(self) -> str:
        return self.ray.util.get_node_ip_address()

    def rank0_device(self) -> torch.device:
        if self.holder is None:
            return torch.device("cpu")
        [gpu] = self.ray.get(self.holder.gpu_ids.remote())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [name.strip() for name in visible.split(",")] if visible else None
        if names is None:
            return torch.device("cuda", int(gpu))
        if str(gpu) not in names:
            raise ValueError(
                f"Ray reserved GPU {gpu} of this node for rank 0, but CUDA_VISIBLE_DEVICES="
                f"{visible} hides it; unset CUDA_VISIBLE_DEVICES for the engine"
            )
        return torch.device("cuda", names.index(str(gpu)))

    def start_workers(self, rendezvous: Rendezvous) -> None:
        for rank, bundle_index in enumerate(self.worker_bundles, start=1):
            actor = self._actor(bundle_index)
            self.actors[rank] = actor
            self.runs[rank] = actor.run.remote(self.spec, rank, rendezvous)

    def dead_workers(self) -> dict[int, str]:
        if not self.runs:
            return {}
        ended, _ = self.ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=0)
        dead = {}
        for rank, ref in self.runs.items():
            if ref in ended:
                try:
                    self.ray.get(ref, timeout=0)
                    dead[rank] = "stopped"
                except Exception as err:  # noqa: BLE001 - how the actor ended
                    dead[rank] = f"died ({type(err).__name__}: {str(err).splitlines()[0]})"
        return dead

    def stop_workers(self) -> None:
        actors = [*self.actors.values(), *([self.holder] if self.holder is not None else [])]
        # Best effort throughout: an actor may be gone already.
        if not self.failure and self.runs:
            with contextlib.suppress(Exception):  # they return from run after shutdown
                self.ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=5.0)
        for actor in actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors, self.holder = {}, None
        with contextlib.suppress(Exception):
            self.ray.util.remove_placement_group(self.placement)
