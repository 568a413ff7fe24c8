"""EngineConfig: every engine option, by concern, built from vLLM-spelled keyword arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanner.engine.scheduler import SchedulerConfig
from lanner.memory.kv_cache import CacheConfig
from lanner.runner.executor import ParallelConfig
from lanner.spec.config import SpeculativeConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"


@dataclass(frozen=True)
class LoadConfig:
    """Which checkpoint, and how its weights are loaded onto which device."""

    model: str = str(DEFAULT_MODEL_DIR)
    tokenizer: str | None = None  # defaults to the model's folder
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None  # cuda when available, else cpu
    load_format: str = "auto"
    # None: the checkpoint's quantization_config (if any); else a method (lanner.model.quant).
    quantization: str | None = None
    # Seeds the engine's random generator: sampling of requests without a seed of their
    # own (vLLM's --seed), and dummy weights.
    seed: int = 0
    trust_remote_code: bool = False
    # Requests' default sampling settings: "auto" (the model's generation_config.json),
    # a folder holding one, or "vllm" (none: SamplingParams' own defaults).
    generation_config: str = "auto"
    # Load no tokenizer: prompts must be token ids, and outputs carry no text.
    skip_tokenizer_init: bool = False

    def local_tokenizer_dir(self) -> Path | None:
        """The folder the tokenizer loads from when ``tokenizer`` (else ``model``) names one
        on this machine, known before the engine core resolves the model; None otherwise
        (a Hub id: the tokenizer loads from the folder the core resolved)."""
        folder = Path(self.tokenizer or self.model).expanduser()
        return folder if folder.is_dir() else None


@dataclass(frozen=True)
class EngineConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Tensor parallelism: tensor_parallel_size, distributed_executor_backend.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # max_model_len None: the model's max_position_embeddings (resolved at load).
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(8192, max_model_len) capped
    scheduling_policy: str = "fcfs"
    # True: never capture CUDA graphs (every step runs eagerly).
    enforce_eager: bool = False
    # Launch step N+1 before reading step N's samples; None: on for CUDA, off elsewhere.
    async_scheduling: bool | None = None
    # CPU threads for the model's operations; None: OMP_NUM_THREADS, else the available
    # cores but one (runner/cpu_threads.py). The CPU only.
    num_threads: int | None = None
    # Speculative decoding (None: off); LLM(...) and the CLI also take it as a dict.
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "speculative_config", SpeculativeConfig.from_value(self.speculative_config)
        )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Sort flat keyword options (as ``LLM(...)`` and the CLI take them) into their
        concern; an unknown name fails with the list of valid ones."""
        groups: dict[str, dict[str, Any]] = {
            "load": {},
            "cache": {},
            "parallel": {},
            "engine": {},
        }
        names = {
            "load": {f.name for f in dataclasses.fields(LoadConfig)},
            "cache": {f.name for f in dataclasses.fields(CacheConfig)},
            "parallel": {f.name for f in dataclasses.fields(ParallelConfig)},
            "engine": {f.name for f in dataclasses.fields(cls)} - {"load", "cache", "parallel"},
        }
        for key, value in kwargs.items():
            group = next((g for g, valid in names.items() if key in valid), None)
            if group is None:
                valid = sorted(set().union(*names.values()))
                raise ValueError(f"unknown engine option {key!r}; valid options are: {valid}")
            groups[group][key] = value
        return cls(
            load=LoadConfig(**groups["load"]),
            cache=CacheConfig(**groups["cache"]),
            parallel=ParallelConfig(**groups["parallel"]),
            **groups["engine"],
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        batched = self.max_num_batched_tokens or max(8192, min(max_model_len, 16384))
        return SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=batched,
            policy=self.scheduling_policy,
        )
