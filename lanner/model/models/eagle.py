"""EAGLE draft heads: one decoder layer of the target's family that reads the target's
hidden state(s) and the embedding of the next token, in the two layouts their authors
publish, and the loader of those checkpoints.

EAGLE-1/2 (``eagle``; e.g. yuhuili/EAGLE-LLaMA3.1-Instruct-8B, lanner/assets/demo-eagle):
    x = fc([embed(t_{p+1}); f_p])           fc: 2H -> H, with a bias when the checkpoint has one
    y = x + attn(x)                         layer 0 has no input norm
    out = y + mlp(post_attention_layernorm(y))
  ``f_p`` is the target's final (normed) hidden state at p; ``out`` is both the head's
  guess of f_{p+1} (fed back for the next draft) and what the target's LM head turns
  into the draft's logits. Tensors: fc.weight, fc.bias?, layers.0.self_attn.{q,k,v,o}_proj,
  layers.0.post_attention_layernorm, layers.0.mlp.{gate,up,down}_proj (embed_tokens and
  lm_head optional: used when they differ from the target's).
EAGLE-3 (``eagle3``; e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B):
    g = fc([a_low; a_mid; a_high])          fc: 3H -> H; the target's residual stream entering
                                            three layers (the fed-back ``out`` in later drafts)
    y = g + attn([input_layernorm(embed(t_{p+1})); hidden_norm(g)])     q/k/v read 2H
    out = y + mlp(post_attention_layernorm(y))
    logits = lm_head(norm(out))             its own LM head over a draft vocabulary;
                                            draft id i is target token i + d2t[i]
  Tensors: fc.weight, midlayer.{input_layernorm,hidden_norm,post_attention_layernorm},
  midlayer.self_attn.*, midlayer.mlp.*, norm.weight, lm_head.weight, d2t (t2d unused).
Checkpoints come as safetensors or as EAGLE's pytorch_model.bin (read with
``weights_only``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lanner.distributed import TensorParallelShard
from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.model.config import ModelConfig
from lanner.model.layers.linear import PackedLinear, materialize
from lanner.model.layers.norm import RMSNorm
from lanner.model.layers.rotary import RotaryEmbedding
from lanner.model.loader import (
    _default_dtype,
    checkpoint_files,
    dummy_init,
    fill_weights,
    iterate_checkpoint,
)
from lanner.model.models.llama import LlamaDecoderLayer, LlamaForCausalLM

EAGLE_LAYOUTS = ("eagle", "eagle3")
# EAGLE-3's default feature layers, as its authors and vLLM/SGLang pick them: the
# residual stream entering layers 2, L // 2 and L - 3 of an L-layer target.
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    return (2, num_layers // 2, num_layers - 3)


class EagleHead(nn.Module):
    """A draft head over its own one-layer paged KV cache. ``forward`` returns the head's
    output feature per row (what the next draft is fed); ``draft_tokens`` turns those
    into greedy draft ids in the target's vocabulary."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(
        self,
        config: ModelConfig,
        layout: str,
        target: LlamaForCausalLM,
        max_positions: int,
        fc_bias: bool,
        feature_size: int,
        draft_vocab_size: int | None = None,
        own_embedding: bool = False,
        own_lm_head: bool = False,
    ) -> None:
        super().__init__()
        if layout not in EAGLE_LAYOUTS:
            raise ValueError(f"EAGLE layout {layout!r} is unknown; use one of {EAGLE_LAYOUTS}")
        self.config = config
        self.layout = layout
        hidden = config.hidden_size
        self.hidden_size = hidden
        # The target is read, never owned: a tuple keeps it out of this module's
        # parameters (and state dict).
        self._target = (target,)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden) if own_embedding else None
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions)
        layer = LlamaDecoderLayer(config, rotary, 0, TensorParallelShard(), None)  # one rank
        self.fc = PackedLinear(feature_size, {None: hidden}, bias=fc_bias)
        self.lm_head: PackedLinear | None = None
        self.norm: RMSNorm | None = None
        if layout == "eagle":
            del layer.input_layernorm  # EAGLE-1's layer 0 attends the fc output as it is
            self.layers = nn.ModuleList([layer])
            if own_lm_head:
                self.lm_head = PackedLinear(hidden, {None: config.vocab_size})
        else:
            attention = layer.self_attn
            attention.qkv_proj = PackedLinear(
                2 * hidden,
                {"q": config.q_size, "k": config.kv_size, "v": config.kv_size},
                bias=config.attention_bias,
            )
            layer.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
            self.midlayer = layer
            self.norm = RMSNorm(hidden, config.rms_norm_eps)
            self.lm_head = PackedLinear(hidden, {None: draft_vocab_size or config.vocab_size})
        self.draft_vocab_size = draft_vocab_size or config.vocab_size
        # EAGLE-3 draft vocabularies map to target ids by an offset per draft id.
        mapped = self.draft_vocab_size != config.vocab_size
        self.d2t: torch.Tensor | None
        self.register_buffer(
            "d2t",
            torch.zeros(self.draft_vocab_size, dtype=torch.long) if mapped else None,
            persistent=False,
        )

    @property
    def feature_width(self) -> int:
        """Width of the target's features a position gives the head: its final hidden
        state (EAGLE-1), or its three feature layers side by side (EAGLE-3)."""
        return self.hidden_size if self.layout == "eagle" else self.fc.in_features

    @property
    def layer(self) -> LlamaDecoderLayer:
        return self.layers[0] if self.layout == "eagle" else self.midlayer

    @property
    def target(self) -> LlamaForCausalLM:
        return self._target[0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(token_ids)
        return self.target.model.embed_tokens(token_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        features: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """input_ids [T] (t_{p+1}), positions [T] (p), features [T, F]: the target's
        (eagle: its final hidden state; eagle3: its three feature layers) or, for a
        chained draft, this head's own previous output [T, H]."""
        layer = self.layer
        embeds = self.embed(input_ids)
        if self.layout == "eagle":
            x = self.fc(torch.cat([embeds, features], dim=-1))
            attended = layer.self_attn(positions, x, kv_caches[0], metadata)
        else:
            x = features if features.shape[-1] == self.hidden_size else self.fc(features)
            inputs = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(x)], dim=-1)
            attended = layer.self_attn(positions, inputs, kv_caches[0], metadata)
        normed, residual = layer.post_attention_layernorm(attended, x)
        return layer.mlp(normed) + residual

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits over the head's vocabulary (the target's, or EAGLE-3's draft one)."""
        if self.norm is not None:
            out = self.norm(out)
        if self.lm_head is not None:
            return self.lm_head(out)
        return self.target.compute_logits(out)

    def draft_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Greedy draft ids [T] in the target's vocabulary."""
        ids = self.compute_logits(out).argmax(dim=-1)
        if self.d2t is not None:
            ids = ids + self.d2t[ids]
        return ids


def read_head_tensors(head_dir: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of a head checkpoint: safetensors (single or sharded), else
    EAGLE's pytorch_model.bin (single or sharded), loaded without unpickling code."""
    if list(head_dir.glob("*.safetensors")):
        files, _ = checkpoint_files(head_dir)
        for path, name, stored in iterate_checkpoint(files):
            yield path, name, materialize(stored)  # read while its file is open
        return
    index = head_dir / BIN_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [head_dir / name for name in names]
    else:
        files = [head_dir / BIN_FILE]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"no EAGLE head weights in {head_dir}: expected *.safetensors or {path.name}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield path, name, tensor


def detect_layout(config: ModelConfig, names: set[str]) -> str:
    """eagle3 for EAGLE-3 checkpoints (their architecture name, or a mid-layer whose
    fc reads three feature vectors); eagle otherwise."""
    if "Eagle3" in config.architecture or any(n.startswith("midlayer.") for n in names):
        return "eagle3"
    return "eagle"


def _normalized(name: str, layout: str) -> str:
    """Our module's name for a checkpoint tensor: converted heads sometimes prefix
    "model." or, for EAGLE-3, call the mid-layer layers.0."""
    name = name.removeprefix("model.")
    if layout == "eagle3" and name.startswith("layers.0."):
        name = "midlayer." + name.removeprefix("layers.0.")
    return name


def load_eagle_head(
    head_dir: Path,
    layout: str,
    target: LlamaForCausalLM,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    load_format: str = "auto",
    seed: int = 0,
) -> EagleHead:
    """Build the head of ``head_dir`` (config.json + weights) on ``device``; its embedding
    and LM head are the target's unless the checkpoint ships different ones. With
    ``load_format="dummy"`` the weights are random (a full-size EAGLE-1 head with a
    bias-free fc, or an EAGLE-3 head with the config's draft vocabulary)."""
    config = ModelConfig.from_pretrained(head_dir)
    raw = config.raw
    target_config: ModelConfig = target.config
    tensors: dict[str, torch.Tensor] = {}
    source = str(head_dir)
    if load_format != "dummy":
        for _, name, tensor in read_head_tensors(head_dir):
            tensors[name] = tensor
        found = detect_layout(config, set(tensors))
        if found != layout:
            kind = "an EAGLE-3 head (a mid-layer)" if found == "eagle3" else "an EAGLE-1/2 head"
            raise ValueError(
                f"speculative_config.model {source} is {kind}, but speculative_config.method "
                f"is {layout!r}; set method to {found!r}"
            )
        tensors = {_normalized(n, layout): t for n, t in tensors.items()}
    if config.hidden_size != target_config.hidden_size:
        raise ValueError(
            f"speculative_config.model {source} has hidden_size {config.hidden_size}, the "
            f"target {target_config.hidden_size}: an EAGLE head reads the target's hidden states"
        )
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(
            f"speculative_config.model {source} has a vocabulary of {config.vocab_size} tokens, "
            f"the target {target_config.vocab_size}: a head must share the target's vocabulary"
        )
    hidden = config.hidden_size
    embedding = tensors.pop("embed_tokens.weight", None)
    own_embedding = embedding is not None and not torch.equal(
        embedding.to(device=device, dtype=dtype), target.model.embed_tokens.weight
    )
    lm_head = tensors.get("lm_head.weight")
    if layout == "eagle":
        fc_bias = "fc.bias" in tensors if tensors else bool(raw.get("bias", False))
        feature_size = 2 * hidden
        draft_vocab = None
        own_lm_head = lm_head is not None and not torch.equal(
            lm_head.to(device=device, dtype=dtype), target.lm_head_weight
        )
        if lm_head is not None and not own_lm_head:
            tensors.pop("lm_head.weight")
    else:
        fc_bias = "fc.bias" in tensors
        feature_size = 3 * hidden
        draft_vocab = int(raw.get("draft_vocab_size") or config.vocab_size)
        own_lm_head = True
    tensors.pop("t2d", None)
    d2t = tensors.pop("d2t", None)
    with _default_dtype(dtype), device:
        head = EagleHead(
            config,
            layout,
            target,
            max(max_positions, config.max_position_embeddings),
            fc_bias,
            feature_size,
            draft_vocab,
            own_embedding,
            own_lm_head,
        )
    head.eval()
    if load_format == "dummy":
        dummy_init(head, seed)
    else:
        if own_embedding:
            tensors["embed_tokens.weight"] = embedding
        if head.d2t is not None:
            if d2t is None:
                raise ValueError(
                    f"EAGLE-3 head {source} has a draft vocabulary of {head.draft_vocab_size} "
                    f"tokens but no d2t tensor mapping it to the target's vocabulary"
                )
            head.d2t.copy_(d2t.to(torch.long))
        fill_weights(head, ((head_dir, n, t) for n, t in tensors.items()), head_dir)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, PackedLinear):
                module.process_weights_after_loading()
    return head


def enable_aux_hidden_states(target: LlamaForCausalLM, config: ModelConfig) -> tuple[int, ...]:
    """Make the target give EAGLE-3's features to its feature cache, once one is set:
    the residual stream entering the layers that a head's config names
    (``eagle_config.eagle_aux_hidden_state_layer_ids`` lists the layers whose output is
    taken, as SGLang reads it: layer i's output enters i + 1; L is the last layer's
    output, before the final norm), else the default three. Returns the indices of the
    layers whose input is kept."""
    num_layers = target.config.num_hidden_layers
    eagle = config.raw.get("eagle_config") or {}
    named = eagle.get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(int(i) + 1 for i in named) if named else default_aux_layers(num_layers)
    if len(set(layers)) != 3 or not all(0 <= i <= num_layers for i in layers):
        raise ValueError(
            f"EAGLE-3 feature layers {layers} do not fit a {num_layers}-layer target: three "
            f"different layer inputs in [0, {num_layers}] are needed "
            f"(eagle_aux_hidden_state_layer_ids in the head's config.json names layer "
            f"outputs, 0-based)"
        )
    target.model.aux_hidden_state_layers = layers
    return layers
