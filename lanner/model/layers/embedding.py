"""Vocabulary-parallel layers: the embedding table's rows split over the tensor-parallel
ranks (each looks up the tokens in its rows, one all-reduce sums them), and the LM head
split the same way (each rank computes its rows' logits, gathered for sampling)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lanner.model.layers.linear import PackedLinear, materialize
from lanner.model.quant.base import shard_layout

if TYPE_CHECKING:
    from lanner.distributed import TensorParallelGroup, TensorParallelShard


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * rows_per_rank, (r + 1) * rows_per_rank) of the table, the last
    rank's rows past the vocabulary zero (a vocabulary that does not divide evenly). The
    same rows serve as a tied LM head, whose padding logits are cut off after the gather."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        shard: TensorParallelShard,
        group: TensorParallelGroup | None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // shard.world_size)
        self.start = shard.rank * self.rows_per_rank
        self.num_rows = max(0, min(vocab_size - self.start, self.rows_per_rank))
        self.checkpoint_shape = (vocab_size, hidden_size)
        self.group = group
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            raise RuntimeError("this model was loaded without its tensor-parallel group")
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        rows = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        rows.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(rows)

    def rank_slice(self, name: str, tensor: Any) -> torch.Tensor:
        """This rank's rows of the checkpoint's [vocab, hidden] table (only they are read),
        zero rows past the vocabulary."""
        if tuple(tensor.shape) != self.checkpoint_shape:
            raise ValueError(f"expected shape {self.checkpoint_shape}, got {tuple(tensor.shape)}")
        return padded_rows(tensor, self.start, self.num_rows, self.rows_per_rank)


def padded_rows(tensor: Any, start: int, count: int, rows: int) -> torch.Tensor:
    """Rows [start, start + count) of ``tensor`` (read alone from a lazy checkpoint
    slice), then zero rows up to ``rows``."""
    kept = materialize(tensor.narrow(0, start, count))
    if count == rows:
        return kept
    return torch.cat([kept, kept.new_zeros(rows - count, *kept.shape[1:])])


class ParallelLMHead(PackedLinear):
    """An untied LM head holding this rank's rows of the vocabulary (as
    VocabParallelEmbedding splits them): [rows_per_rank, hidden], padded with zero rows on
    the last rank when the vocabulary does not divide evenly (unquantized heads only; a
    quantized one needs a vocabulary the ranks divide)."""

    parallel = "column"

    def __init__(self, hidden_size: int, vocab_size: int, shard: TensorParallelShard) -> None:
        self.rows_per_rank = -(-vocab_size // shard.world_size)
        super().__init__(hidden_size, {None: self.rows_per_rank})
        self.start = shard.rank * self.rows_per_rank
        self.num_rows = max(0, min(vocab_size - self.start, self.rows_per_rank))
        self.padded = self.rows_per_rank * shard.world_size != vocab_size
        self.part_slices = [(shard.rank, shard.world_size)]
        self.checkpoint_in_features = hidden_size
        self.checkpoint_shard_sizes = {None: vocab_size}

    def rank_slice(self, name: str, tensor: Any, shard_id: str | None) -> torch.Tensor:
        if not self.padded:
            return super().rank_slice(name, tensor, shard_id)
        layout = shard_layout(getattr(self, name))
        if layout.output_dim is None:
            return materialize(tensor)
        if name != "weight" or layout.output_dim != 0 or layout.output_pack != 1:
            raise ValueError(
                f"lm_head.{name}: a quantized LM head needs a vocabulary that "
                f"tensor_parallel_size divides evenly"
            )
        return padded_rows(tensor, self.start, self.num_rows, self.rows_per_rank)
