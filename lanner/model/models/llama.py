"""The Llama-family decoder; Mistral, Qwen2 and Qwen3 are the same network with other flags.

Differences handled by ModelConfig: Qwen2's q/k/v bias (``attention_bias``),
Qwen3's per-head RMSNorm of q and k before rotary (``qk_norm``), Mistral's
sliding window, tied or untied embeddings, and any head_dim.

Under tensor parallelism (Megatron-style) each rank builds its slice: q/k/v and gate/up
column-parallel, o and down row-parallel (one all-reduce each), the embedding and LM head
split by vocabulary; a rank holds num_heads / N query heads and their KV heads (one KV
head, shared with other ranks, when there are fewer KV heads than ranks).
"""

from __future__ import annotations

import torch
from torch import nn

from lanner.distributed import TensorParallelGroup, TensorParallelShard
from lanner.kernels import ops
from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.model.config import ModelConfig
from lanner.model.layers.activation import SiluAndMul
from lanner.model.layers.attention import PagedAttention
from lanner.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from lanner.model.layers.linear import PackedLinear, column_parallel, row_parallel
from lanner.model.layers.norm import RMSNorm
from lanner.model.layers.rotary import RotaryEmbedding


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Raise ValueError naming the field when the model cannot be split ``world_size``
    ways."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads={heads} is not a multiple of it")
    if kv_heads % world_size and world_size % kv_heads:
        problems.append(
            f"num_key_value_heads={kv_heads} neither divides it nor is a multiple of it"
        )
    if config.intermediate_size % world_size:
        problems.append(f"intermediate_size={config.intermediate_size} is not a multiple of it")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={world_size} cannot split this model: "
            f"{'; '.join(problems)}; choose a tensor_parallel_size that divides them"
        )


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        layer_index: int,
        shard: TensorParallelShard,
        group: TensorParallelGroup | None,
    ) -> None:
        super().__init__()
        world = shard.world_size
        self.num_heads = config.num_attention_heads // world
        self.num_kv_heads = shard.kv_heads_per_rank(config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        kv_slice = shard.kv_head_slice(config.num_key_value_heads)
        self.qkv_proj = column_parallel(
            config.hidden_size,
            {"q": config.q_size, "k": config.kv_size, "v": config.kv_size},
            config.attention_bias,
            shard,
            [(shard.rank, world), kv_slice, kv_slice],
        )
        # HF gives o_proj a bias with attention_bias, except Qwen2 (q/k/v bias only).
        self.o_proj = row_parallel(
            config.q_size,
            config.hidden_size,
            config.attention_bias and config.model_type != "qwen2",
            shard,
            group,
        )
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            config.layer_sliding_windows[layer_index],
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q = ops.qkv_prepare(
            q,
            k,
            v,
            positions,
            self.rotary.cos_sin_cache,
            kv_cache,
            metadata.slot_mapping,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 0.0,
        )
        return self.o_proj(self.attn(q, kv_cache, metadata))


class LlamaMLP(nn.Module):
    def __init__(
        self, config: ModelConfig, shard: TensorParallelShard, group: TensorParallelGroup | None
    ) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = column_parallel(
            config.hidden_size, {"gate": size, "up": size}, config.mlp_bias, shard
        )
        self.down_proj = row_parallel(size, config.hidden_size, config.mlp_bias, shard, group)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        layer_index: int,
        shard: TensorParallelShard,
        group: TensorParallelGroup | None,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, layer_index, shard, group)
        self.mlp = LlamaMLP(config, shard, group)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm fuses in the add.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, shard: TensorParallelShard, group: TensorParallelGroup | None
    ) -> None:
        super().__init__()
        self.embed_tokens: nn.Module = (
            nn.Embedding(config.vocab_size, config.hidden_size)
            if shard.world_size == 1
            else VocabParallelEmbedding(config.vocab_size, config.hidden_size, shard, group)
        )
        # One rotary table shared by all layers.
        rotary = RotaryEmbedding(config.head_dim, config.rope, config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary, i, shard, group)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # An EAGLE head reads the target's features of every position it computed: with
        # a feature cache (rows by KV cache slot, one spare row last, where padding rows,
        # whose slot is -1, write), each forward writes its tokens' features there, CUDA
        # graph replays included, so a head catches up on steps it did not run beside.
        # The features: the final hidden states (EAGLE-1), or for EAGLE-3 the residual
        # stream entering these layers (index L: after the last one, before the norm),
        # side by side.
        self.aux_hidden_state_layers: tuple[int, ...] = ()
        self.feature_cache: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        aux: list[torch.Tensor] = []
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if index in self.aux_hidden_state_layers:
                aux.append(hidden_states if residual is None else hidden_states + residual)
            hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, metadata)
        if len(self.layers) in self.aux_hidden_state_layers:
            aux.append(hidden_states + residual)
        cache = self.feature_cache
        if cache is not None and aux:
            self._write_features(cache, metadata, torch.cat(aux, dim=-1))
        hidden_states, _ = self.norm(hidden_states, residual)
        if cache is not None and not aux:
            self._write_features(cache, metadata, hidden_states)
        return hidden_states

    @staticmethod
    def _write_features(
        cache: torch.Tensor, metadata: AttentionMetadata, features: torch.Tensor
    ) -> None:
        cache.index_copy_(0, metadata.slot_mapping.remainder(cache.shape[0]), features)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. ``forward`` returns hidden states for every token;
    ``compute_logits`` turns only the rows that sample into logits."""

    # checkpoint projection name -> (our packed parameter, shard id)
    packed_modules_mapping: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(
        self,
        config: ModelConfig,
        shard: TensorParallelShard | None = None,
        group: TensorParallelGroup | None = None,
    ) -> None:
        """``shard``: which tensor-parallel slice to build (default: the whole model);
        ``group``: the ranks' process group its collectives run over (a model built
        without one loads, but cannot run)."""
        super().__init__()
        shard = shard or TensorParallelShard()
        check_tensor_parallel(config, shard.world_size)
        self.config = config
        self.shard = shard
        self.group = group
        self.model = LlamaModel(config, shard, group)
        self.lm_head: PackedLinear | None
        if config.tie_word_embeddings:
            self.lm_head = None
        elif shard.world_size == 1:
            # A PackedLinear of one part, so a checkpoint that quantizes its head loads it.
            self.lm_head = PackedLinear(config.hidden_size, {None: config.vocab_size})
        else:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, shard)
        self.model.embed_tokens.weight.requires_grad_(False)
        if shard.world_size > 1:
            # Set on the instance, so the unsplit model's compute_logits stays as it is.
            self.compute_logits = self._gather_logits

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The head's [vocab, hidden] matrix in the model dtype (not for a quantized head)."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        return self.model(input_ids, positions, metadata, kv_caches)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return ops.linear(hidden_states, self.model.embed_tokens.weight)
        return self.lm_head(hidden_states)

    def _gather_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """compute_logits of a tensor-parallel rank: each rank computes its vocabulary
        rows' logits; side by side they are the whole, padded to a multiple of the ranks
        (cut off here). Only the rows that sample come in; rank 0 samples from them."""
        logits = LlamaForCausalLM.compute_logits(self, hidden_states)
        if self.group is None:
            raise RuntimeError("this model was loaded without its tensor-parallel group")
        gathered = self.group.all_gather(logits)
        vocab = self.config.vocab_size
        return gathered if gathered.shape[1] == vocab else gathered[:, :vocab].contiguous()
