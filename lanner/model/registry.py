"""Maps a checkpoint's `architectures` name to the lanner model class that runs it."""

from __future__ import annotations

from torch import nn

from lanner.model.config import ModelConfig
from lanner.model.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"architecture {config.architecture!r} (from config.json 'architectures') is not "
            f"supported; lanner runs: {supported}"
        ) from None
