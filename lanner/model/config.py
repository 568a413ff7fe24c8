"""Model configuration read from a checkpoint's config.json, normalized across families."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn a user or config dtype spelling into a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of 'auto', 'float32', 'bfloat16', 'float16'"
        )
    return _DTYPES[name]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (theta plus an optional scaling rule)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The shape and options of a decoder-only model, as lanner needs them."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: the attention window in tokens, or None for full attention.
    layer_sliding_windows: tuple[int | None, ...] = ()
    hidden_act: str = "silu"
    checkpoint_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}: expected {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        # generation_config.json may name more end tokens (e.g. a chat turn's end);
        # generation stops at any of them, as in HF generate and vLLM.
        generation = Path(model_dir) / "generation_config.json"
        if generation.is_file():
            extra = json.loads(generation.read_text()).get("eos_token_id")
            extra_ids = extra if isinstance(extra, list) else [] if extra is None else [extra]
            config_eos = raw.get("eos_token_id")
            config_ids = (
                config_eos
                if isinstance(config_eos, list)
                else ([] if config_eos is None else [config_eos])
            )
            raw = {**raw, "eos_token_id": list(dict.fromkeys(config_ids + extra_ids))}
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ValueError(f"{source} has no 'architectures' entry; cannot pick a model class")
        architecture = architectures[0]
        model_type = raw.get("model_type", "")

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ValueError(f"{source} lacks required field {key!r}")
            return raw[key]

        hidden_size = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        head_dim = int(raw.get("head_dim") or hidden_size // num_heads)

        # Qwen2 always has q/k/v bias; Llama and Mistral read `attention_bias`.
        attention_bias = bool(raw.get("attention_bias", model_type == "qwen2"))
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(
                f"{source}: hidden_act {hidden_act!r} is not supported; lanner runs silu models"
            )
        num_layers = int(need("num_hidden_layers"))

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype")
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_sliding_windows=_layer_sliding_windows(raw, model_type, num_layers),
            hidden_act=hidden_act,
            checkpoint_dtype=parse_dtype(dtype_name) if dtype_name else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=raw,
        )


def _layer_sliding_windows(
    raw: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, ...]:
    """Which layers attend through a sliding window. transformers 5 writes `layer_types`;
    older Qwen2/Qwen3 configs give `use_sliding_window` and `max_window_layers` (layers at
    or above it slide); Mistral slides every layer when `sliding_window` is set."""
    window = raw.get("sliding_window")
    if not window:
        return (None,) * num_layers
    if raw.get("layer_types"):
        return tuple(
            int(window) if kind == "sliding_attention" else None for kind in raw["layer_types"]
        )
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    """Read rope settings from either spelling: transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling` that most hub checkpoints carry."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope type {rope_type!r} is not supported; lanner supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    original = params.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original else None,
    )


# generation_config.json's sampling settings -> the SamplingParams fields they default
# (vLLM's list: a request that leaves one unset gets the model's value).
GENERATION_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_sampling_defaults(model_dir: str | Path, source: str = "auto") -> dict[str, Any]:
    """The default sampling settings a checkpoint recommends, as SamplingParams fields:
    from ``model_dir``'s generation_config.json ("auto"), another folder's, or none
    ("vllm", vLLM's spelling for SamplingParams' own defaults)."""
    if source == "vllm":
        return {}
    folder = Path(model_dir) if source == "auto" else Path(source).expanduser()
    if source != "auto" and not folder.is_dir():
        raise ValueError(
            f"generation_config {source!r} is not 'auto', 'vllm' or a folder holding a "
            f"generation_config.json"
        )
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return {
        field: raw[key]
        for key, field in GENERATION_SAMPLING_FIELDS.items()
        if raw.get(key) is not None
    }
