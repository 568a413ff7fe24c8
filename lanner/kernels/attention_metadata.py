"""AttentionMetadata: how one flattened varlen batch maps onto the paged KV cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lanner.kernels.transfer import to_device

# Cascade attention (decode sequences reading a shared KV prefix once for the whole
# batch) pays off once many sequences share a long prefix; below these it is skipped.
CASCADE_MIN_SEQS = 32
CASCADE_MIN_TOKENS = 256


def shared_prefix_tokens(
    block_tables: list[list[int]], seq_lens: list[int], block_size: int
) -> int:
    """Tokens at the start of every sequence that live in the same cache blocks (full
    blocks only, and short of every sequence's last token), or 0 when the batch is too
    small or the prefix too short for cascade attention."""
    if len(block_tables) < CASCADE_MIN_SEQS:
        return 0
    # commonprefix compares only the lexicographically smallest and largest tables.
    common = len(os.path.commonprefix(block_tables))
    tokens = min(common * block_size, (min(seq_lens) - 1) // block_size * block_size)
    return tokens if tokens >= CASCADE_MIN_TOKENS else 0


@dataclass
class AttentionMetadata:
    """Describes one step's batch to every attention layer.

    The batch is flat: the new tokens of all sequences are concatenated, with no
    padding. Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``
    and, after this step's tokens are written, has ``seq_lens[i]`` tokens of context
    in the cache; its queries are the last ``query_len`` positions of that context.
    """

    # [num_seqs + 1] int32: prefix sums of the per-sequence query lengths
    query_start_loc: torch.Tensor
    # [num_seqs] int32: context length of each sequence including this step's tokens
    seq_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32: cache block ids of each sequence, in order
    block_tables: torch.Tensor
    # [num_tokens] int64: cache slot (block_id * block_size + offset) of each new token;
    # -1 marks a padding token whose K/V must not be written
    slot_mapping: torch.Tensor
    # Host copies, so the reference path and kernel launch grids need no device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # The Triton path runs one-token queries (decodes) and longer chunks (prefill,
    # extend) in separate kernels; these list each kind's sequence indices.
    decode_seq_indices: torch.Tensor | None = None  # [num_decode] int32
    prefill_seq_indices: torch.Tensor | None = None  # [num_prefill] int32
    num_decode: int = 0
    num_prefill: int = 0
    # Fixed number of KV splits for decode (CUDA graphs need it constant); None: chosen
    # per step from the batch.
    num_kv_splits: int | None = None
    # Cascade attention: the first shared_prefix_len tokens of every decode sequence sit
    # in the same blocks ([1] int32 on the device); the host value, or under CUDA graphs
    # an upper bound, is 0 when there is no cascade.
    shared_prefix_len: torch.Tensor | None = None
    shared_prefix_len_cpu: int = 0
    # The CPU path's gather indices and masks for this step, built by its first layer
    # (kernels/cpu_attention.py) and reused by the others.
    host_plan: object | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        starts = self.query_start_loc_cpu
        return max((b - a for a, b in zip(starts, starts[1:], strict=False)), default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Build metadata from per-sequence host lists (query lengths, context lengths
        and block ids); the slot of every new token follows from its position."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry a sequence")
        starts = [0]
        slots: list[int] = []
        for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            if not 0 < query_len <= seq_len:
                raise ValueError(f"query_len {query_len} must be in [1, seq_len={seq_len}]")
            if len(table) * block_size < seq_len:
                raise ValueError(
                    f"{len(table)} blocks of {block_size} cannot hold {seq_len} tokens"
                )
            starts.append(starts[-1] + query_len)
            for pos in range(seq_len - query_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        prefills = [i for i, n in enumerate(query_lens) if n > 1]
        prefix = shared_prefix_tokens(
            [block_tables[i] for i in decodes], [seq_lens[i] for i in decodes], block_size
        )
        return cls(
            query_start_loc=to_device(starts, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            block_tables=to_device(padded, torch.int32, device).reshape(len(block_tables), width),
            slot_mapping=to_device(slots, torch.int64, device),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            decode_seq_indices=to_device(decodes, torch.int32, device),
            prefill_seq_indices=to_device(prefills, torch.int32, device),
            num_decode=len(decodes),
            num_prefill=len(prefills),
            shared_prefix_len=to_device([prefix], torch.int32, device) if prefix else None,
            shared_prefix_len_cpu=prefix,
        )
