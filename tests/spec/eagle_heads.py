"""Writers of tiny EAGLE head checkpoints in the published layouts, for the tests.

- ``write_eagle_head``: EAGLE-1/2 (fc over [embedding; feature], layers.0 without an input
  norm), random, as safetensors or EAGLE's pytorch_model.bin.
- ``write_copy_head`` with ``build_one_layer_target``: a head that nearly reproduces a
  one-layer target, so its drafts are mostly accepted (see ``write_copy_head``).
- ``write_eagle3_head``: EAGLE-3 (midlayer over [norm(embedding); norm(fc(3 features))],
  its own LM head over a draft vocabulary mapped by d2t), as pytorch_model.bin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from tests.tiny_models import build_tokenizer


def _config(target_dir: Path, **changes) -> dict:
    config = json.loads((target_dir / "config.json").read_text())
    config.update(num_hidden_layers=1, **changes)
    config.pop("layer_types", None)
    return config


def _layer_tensors(config: dict, generator: torch.Generator, prefix: str, in_size: int) -> dict:
    hidden = config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    size = config["intermediate_size"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * shape[-1] ** -0.5

    tensors = {
        f"{prefix}self_attn.q_proj.weight": rand(heads * head_dim, in_size),
        f"{prefix}self_attn.k_proj.weight": rand(kv_heads * head_dim, in_size),
        f"{prefix}self_attn.v_proj.weight": rand(kv_heads * head_dim, in_size),
        f"{prefix}self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        f"{prefix}post_attention_layernorm.weight": 1
        + 0.1 * torch.randn(hidden, generator=generator),
        f"{prefix}mlp.gate_proj.weight": rand(size, hidden),
        f"{prefix}mlp.up_proj.weight": rand(size, hidden),
        f"{prefix}mlp.down_proj.weight": rand(hidden, size),
    }
    if config.get("attention_bias"):
        for name in ("q", "k", "v"):
            rows = tensors[f"{prefix}self_attn.{name}_proj.weight"].shape[0]
            tensors[f"{prefix}self_attn.{name}_proj.bias"] = 0.1 * torch.randn(
                rows, generator=generator
            )
    if config.get("model_type") == "qwen3":
        tensors[f"{prefix}self_attn.q_norm.weight"] = 1 + 0.1 * torch.randn(
            head_dim, generator=generator
        )
        tensors[f"{prefix}self_attn.k_norm.weight"] = 1 + 0.1 * torch.randn(
            head_dim, generator=generator
        )
    return tensors


def _save(out_dir: Path, config: dict, tensors: dict, fmt: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if fmt == "bin":
        torch.save(tensors, out_dir / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def write_eagle_head(
    out_dir: Path,
    target_dir: Path,
    seed: int = 0,
    fc_bias: bool = False,
    fmt: str = "safetensors",
    embedding: torch.Tensor | None = None,
) -> Path:
    """A random EAGLE-1 head for the target in ``target_dir`` (fc.bias when asked; the
    target's embedding copied in when given, as EAGLE's own checkpoints carry it)."""
    config = _config(target_dir, bias=fc_bias)
    generator = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    tensors = _layer_tensors(config, generator, "layers.0.", hidden)
    tensors["fc.weight"] = (
        torch.randn(hidden, 2 * hidden, generator=generator) * (2 * hidden) ** -0.5
    )
    if fc_bias:
        tensors["fc.bias"] = 0.1 * torch.randn(hidden, generator=generator)
    if embedding is not None:
        tensors["embed_tokens.weight"] = embedding.clone()
    return _save(out_dir, config, tensors, fmt)


def build_one_layer_target(out_dir: Path, seed: int = 0) -> Path:
    """A tiny one-layer Llama whose embedding rows have unit RMS and whose norms are one,
    so that its input norm leaves embeddings as they are (``write_copy_head`` needs it)."""
    config = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
        embedding = model.model.embed_tokens.weight
        embedding.div_(embedding.pow(2).mean(-1, keepdim=True).sqrt())
        model.lm_head.weight.mul_(4.0)  # peaked logits: fewer near-ties between tokens
    model.save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_copy_head(
    out_dir: Path, target_dir: Path, feature_weight: float = 0.05, noise: float = 0.0, seed: int = 0
) -> Path:
    """An EAGLE-1 head that nearly reproduces ``build_one_layer_target``'s model: fc passes
    the embedding of t_{p+1} (plus ``feature_weight`` of a random mix of the feature, so
    its K/V depend on the features too) and the layer is the target's. Its entry at p then
    computes what the target computes at p + 1 (rotary sees the same relative positions;
    only the target's first token is missing from its context), and the target's argmax
    is unchanged by the final norm (weights one): drafts are mostly, not always, right."""
    target = transformers.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    state = {k: v for k, v in target.state_dict().items()}
    config = _config(target_dir, bias=False)
    hidden = config["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    fc = torch.zeros(hidden, 2 * hidden)
    fc[:, :hidden] = torch.eye(hidden)
    fc[:, hidden:] = (
        feature_weight * torch.randn(hidden, hidden, generator=generator) * hidden**-0.5
    )
    tensors = {"fc.weight": fc}
    for name, value in state.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            tensor = value.clone()
            if noise:
                tensor += noise * tensor.std() * torch.randn(tensor.shape, generator=generator)
            tensors[name.removeprefix("model.")] = tensor
    return _save(out_dir, config, tensors, "safetensors")


def write_eagle3_head(
    out_dir: Path,
    target_dir: Path,
    draft_vocab_size: int,
    seed: int = 0,
    aux_layer_ids: list[int] | None = None,
) -> Path:
    """A random EAGLE-3 head as its authors publish it: LlamaForCausalLMEagle3, a
    pytorch_model.bin with midlayer.*, fc [H, 3H], norm, lm_head over ``draft_vocab_size``
    tokens and d2t/t2d (draft id i is target token i + d2t[i]: here every other one)."""
    config = _config(target_dir, architectures=["LlamaForCausalLMEagle3"])
    config["draft_vocab_size"] = draft_vocab_size
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layer_ids}
    generator = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    tensors = _layer_tensors(config, generator, "midlayer.", 2 * hidden)
    tensors["midlayer.input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    tensors["midlayer.hidden_norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    tensors["fc.weight"] = (
        torch.randn(hidden, 3 * hidden, generator=generator) * (3 * hidden) ** -0.5
    )
    tensors["norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    tensors["lm_head.weight"] = torch.randn(draft_vocab_size, hidden, generator=generator)
    vocab = config["vocab_size"]
    chosen = torch.arange(0, vocab, 2)[:draft_vocab_size]
    tensors["d2t"] = chosen - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    tensors["t2d"] = t2d
    return _save(out_dir, config, tensors, "bin")
