"""Builders of tiny random HF checkpoints (with a real BPE tokenizer) for the tests.

Each family gets odd shapes on purpose: head_dim != hidden / heads, a single KV
head, tied embeddings, rope scaling, Qwen2 bias, Qwen3 q/k norm, a sliding window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
    "The quick brown fox jumps over the lazy dog. Hello world, hello lanner!",
    "import os\nimport sys\nfor path in sys.argv[1:]:\n    print(os.path.getsize(path))",
    "Serving large language models needs paged attention and continuous batching.",
] * 20

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # head_dim 24 != 64 / 4, one KV head, llama3 rope scaling, untied head
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            intermediate_size=112,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    # GQA 4:2 and a sliding window shorter than the test sequences
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            sliding_window=24,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # q/k/v bias, tied embeddings, linear rope scaling
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            num_hidden_layers=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    # q/k RMSNorm, head_dim 32 (q_size 128 != hidden 64), one KV head, tied
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=96,
            num_hidden_layers=3,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with chat special tokens."""
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_hf_model(family: str, seed: int = 0, **shape: Any) -> transformers.PreTrainedModel:
    """A random model of ``family``; ``shape`` overrides its config's sizes."""
    config_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(**_COMMON, **{**overrides, **shape})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # HF initializes with std 0.02; larger weights make logits (and bugs) visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3 if "embed" in name else param.shape[1] ** -0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.float().eval()


def save_tiny_model(family: str, out_dir: Path, shard_kb: int | None = None) -> Path:
    model = build_hf_model(family)
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(out_dir, **kwargs)
    build_tokenizer().save_pretrained(out_dir)
    return out_dir
