"""Runs an EAGLE head on the device over its own paged KV cache: the catch-up forward
over verified positions (fed the target's features) and the greedy draft chain (fed the
head's own outputs), eagerly or by replaying CUDA graphs.

Both paths run the same code: the chain computes each step's positions, cache slots and
context lengths on the device from per-row bases and limits, so a captured chain needs
no host work between its steps. Graphs: the catch-up forward as decode graphs (one
verified position a row, as the target's verify rows; its features through a static
buffer), and one chain graph per batch bucket and draft length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lanner.kernels import ops
from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.paged_attention import choose_num_kv_splits
from lanner.kernels.transfer import to_device
from lanner.memory.kv_cache import allocate_kv_caches
from lanner.model.models.eagle import EagleHead
from lanner.runner.cuda_graphs import (
    DecodeGraphs,
    StagedInputs,
    capture_sizes,
    pack_block_tables,
)

logger = logging.getLogger(__name__)


@dataclass
class CatchUp:
    """Verified positions for the head to compute, one row each, grouped in runs of one
    request's consecutive positions."""

    token_ids: list[int] = field(default_factory=list)  # t_{p+1} of each row at p
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # the row's KV slot: its feature's row
    # Per run: its rows, its context once written (last position + 1), its block table.
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)

    def add_run(
        self, token_ids: list[int], start: int, block_table: list[int], block_size: int
    ) -> int:
        """Positions start .. start + len(token_ids) - 1; returns the run's last row."""
        count = len(token_ids)
        positions = range(start, start + count)
        self.token_ids += token_ids
        self.positions += positions
        size = block_size
        self.slots += [block_table[p // size] * size + p % size for p in positions]
        self.query_lens.append(count)
        self.seq_lens.append(start + count)
        self.block_tables.append(block_table)
        return len(self.token_ids) - 1


class EagleHeadRunner:
    def __init__(
        self,
        head: EagleHead,
        block_size: int,
        cache_dtype: torch.dtype,
        device: torch.device,
        enforce_eager: bool,
        max_draft_tokens: int,
    ) -> None:
        self.head = head
        self.block_size = block_size
        self.cache_dtype = cache_dtype
        self.device = device
        self.enforce_eager = enforce_eager
        self.max_draft_tokens = max_draft_tokens
        self.kv_caches: list[torch.Tensor] = []
        # The target's features by KV slot (a spare row last for padding rows), which
        # the target's forward writes (LlamaModel.feature_cache).
        self.feature_cache = torch.empty(0)
        self.catch_up_graphs: CatchUpGraphs | None = None
        self.chain_graphs: ChainGraphs | None = None
        self._arange = torch.arange(1, dtype=torch.int32, device=device)

    def initialize_cache(self, num_blocks: int, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate the head's cache (num_blocks of the target's block size) and, on CUDA
        unless enforce_eager, capture its graphs."""
        self.kv_caches = allocate_kv_caches(
            self.head.config, num_blocks, self.block_size, self.cache_dtype, self.device
        )
        self.feature_cache = torch.zeros(
            (num_blocks * self.block_size + 1, self.head.feature_width),
            dtype=self.head.fc.weight.dtype,
            device=self.device,
        )
        self._arange = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=self.device)
        if self.device.type != "cuda" or self.enforce_eager:
            return
        started = time.perf_counter()
        # Catch-up rows: a verified run is at most k + 2 positions a request.
        rows = min(max_num_seqs * (self.max_draft_tokens + 2), max(max_num_seqs, 512))
        self.catch_up_graphs = CatchUpGraphs(
            self.head, self.kv_caches, self.block_size, rows, max_model_len
        )
        self.catch_up_graphs.capture()
        self.chain_graphs = ChainGraphs(self, max_num_seqs, max_model_len)
        self.chain_graphs.capture()
        logger.info("captured the EAGLE head's graphs in %.1fs", time.perf_counter() - started)

    @torch.inference_mode()
    def catch_up(self, batch: CatchUp) -> torch.Tensor:
        """Write the head's K/V at every row's position, from the target's features in
        the feature cache, and return its output [rows, H] (valid until the head's next
        catch-up)."""
        features = self.feature_cache
        rows = len(batch.token_ids)
        graphs = self.catch_up_graphs
        if graphs is not None and graphs.can_run(rows):
            tables, seq_lens = [], []
            for count, end, table in zip(
                batch.query_lens, batch.seq_lens, batch.block_tables, strict=True
            ):
                tables += [table] * count
                seq_lens += range(end - count + 1, end + 1)
            staged = graphs.stage_rows(
                batch.token_ids, batch.positions, batch.slots, seq_lens, tables, batch.slots
            )
            return graphs.replay_rows(staged, features)
        index = to_device(batch.slots, torch.long, self.device)
        metadata = AttentionMetadata.build(
            batch.query_lens, batch.seq_lens, batch.block_tables, self.block_size, self.device
        )
        return self.head(
            to_device(batch.token_ids, torch.long, self.device),
            to_device(batch.positions, torch.long, self.device),
            features.index_select(0, index),
            metadata,
            self.kv_caches,
        )

    @torch.inference_mode()
    def draft(
        self,
        outputs: torch.Tensor,
        rows: list[int],
        bases: list[int],
        limits: list[int],
        block_tables: list[list[int]],
        steps: int,
    ) -> torch.Tensor:
        """Greedy drafts [len(rows), steps] of the requests whose last verified position's
        head output is ``outputs[rows[i]]``: draft 1 from it, draft j + 1 from a head step
        at position bases[i] + j - 1 (no further than limits[i]; the K/V of positions past
        it is not written)."""
        graphs = self.chain_graphs
        if graphs is not None and graphs.can_run(len(rows), steps):
            return graphs.run(outputs, rows, bases, limits, block_tables, steps)
        index = to_device(rows, torch.long, self.device)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        tables = to_device(padded, torch.int32, self.device).view(len(padded), width)

        def host_seq_lens(step: int) -> list[int]:
            return [min(b + step - 1, lim) + 1 for b, lim in zip(bases, limits, strict=True)]

        return self.chain(
            outputs.index_select(0, index),
            to_device(bases, torch.long, self.device),
            to_device(limits, torch.long, self.device),
            tables,
            steps,
            host_seq_lens,
            None,
        )

    def chain(
        self,
        feed: torch.Tensor,
        bases: torch.Tensor,
        limits: torch.Tensor,
        tables: torch.Tensor,
        steps: int,
        host_seq_lens: Callable[[int], list[int]],
        num_kv_splits: int | None,
    ) -> torch.Tensor:
        """The draft chain on device tensors (eager, or inside a graph capture, where
        ``host_seq_lens`` gives upper bounds and ``num_kv_splits`` is fixed)."""
        head, size = self.head, self.block_size
        batch = feed.shape[0]
        token_ids = head.draft_tokens(feed)
        drafted = [token_ids]
        for step in range(1, steps):
            wanted = bases + (step - 1)
            positions = torch.minimum(wanted, limits)
            blocks = tables.gather(1, (positions // size).unsqueeze(1)).squeeze(1).long()
            slots = torch.where(wanted <= limits, blocks * size + positions % size, -1)
            metadata = AttentionMetadata(
                query_start_loc=self._arange[: batch + 1],
                seq_lens=(positions + 1).to(torch.int32),
                block_tables=tables,
                slot_mapping=slots,
                query_start_loc_cpu=list(range(batch + 1)),
                seq_lens_cpu=host_seq_lens(step),
                decode_seq_indices=self._arange[:batch],
                prefill_seq_indices=self._arange[:0],
                num_decode=batch,
                num_prefill=0,
                num_kv_splits=num_kv_splits,
            )
            feed = head(token_ids, positions, feed, metadata, self.kv_caches)
            token_ids = head.draft_tokens(feed)
            drafted.append(token_ids)
        return torch.stack(drafted, dim=1)


class CatchUpGraphs(DecodeGraphs):
    """The head's catch-up forward as decode graphs: each verified position one row,
    its feature read from ``features``, written before each replay. ``replay`` returns the
    head's outputs (where the target's graphs return logits)."""

    def __init__(
        self,
        head: EagleHead,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_rows: int,
        max_model_len: int,
    ) -> None:
        super().__init__(
            head, kv_caches, block_size, max_rows, max_model_len, head.config.num_key_value_heads
        )
        self.features = torch.zeros(
            (self.max_batch, head.feature_width),
            dtype=head.fc.weight.dtype,
            device=kv_caches[0].device,
        )

    def stage_rows(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        feature_rows: list[int],
    ) -> StagedInputs:
        """``stage``, with each row's feature row in the source (in the block's
        token-source field, which catch-up rows have no other use for)."""
        staged = self.stage(token_ids, positions, slots, seq_lens, block_tables)
        start = self.layout.token_sources
        self.host_sets[staged.turn].numpy()[start : start + len(feature_rows)] = feature_rows
        return staged

    def replay_rows(self, staged: StagedInputs, features: torch.Tensor) -> torch.Tensor:
        """Replay for ``stage_rows``' inputs, each row's feature gathered from
        ``features`` by the staged rows; the head's outputs."""
        self.copy_inputs(staged)
        start = self.layout.token_sources
        rows = self.packed[start : start + staged.count]
        torch.index_select(features, 0, rows, out=self.features[: staged.count])
        return self.launch(staged)

    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            self.input_ids[:batch],
            self.positions[:batch],
            self.features[:batch],
            self.metadata(batch),
            self.kv_caches,
        )
        return out, out


class ChainGraphs:
    """One graph per (batch bucket, draft length) of the draft chain. Padding rows start
    past their limit (base 1, limit 0): they write no K/V and their drafts are dropped."""

    def __init__(self, runner: EagleHeadRunner, max_num_seqs: int, max_model_len: int) -> None:
        self.runner = runner
        head = runner.head
        device = runner.device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_steps = runner.max_draft_tokens
        self.max_model_len = max_model_len
        n = self.max_batch
        self.max_blocks = -(-max_model_len // runner.block_size)
        self.feed = torch.zeros((n, head.hidden_size), dtype=head.fc.weight.dtype, device=device)
        # One packed int64 block a replay, copied in one go: bases [0, r), limits
        # [r, 2r), each row's output row in the catch-up [2r, 3r), the tables' width 3r,
        # the tables (row after row at that width) from 3r + 2; r = n rounded up to even
        # (16-byte aligned fields). The graph spreads the tables to their int32 stride.
        r = n + n % 2
        self.offsets = {"bases": 0, "limits": r, "rows": 2 * r, "width": 3 * r, "tables": 3 * r + 2}
        size = self.offsets["tables"] + n * self.max_blocks
        self.packed = torch.zeros(size, dtype=torch.long, device=device)
        self.bases = self.packed[:n]
        self.bases.fill_(1)  # rows past their limit (base 1, limit 0) until staged
        self.limits = self.packed[r : r + n]
        self.tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        # Pinned staging, so the copy is asynchronous; the step before has been read when
        # the next is staged (speculation runs one step at a time).
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=True)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None

    def can_run(self, batch: int, steps: int) -> bool:
        return 0 < batch <= self.max_batch and 0 < steps <= self.max_steps

    def _chain(self, batch: int, steps: int) -> torch.Tensor:
        num_kv_splits = choose_num_kv_splits(
            batch, self.runner.head.config.num_key_value_heads, self.max_model_len
        )
        offsets = self.offsets
        ops.widen_block_tables(self.packed, offsets["width"], offsets["tables"], batch, self.tables)
        return self.runner.chain(
            self.feed[:batch],
            self.bases[:batch],
            self.limits[:batch],
            self.tables[:batch],
            steps,
            lambda step: [self.max_model_len] * batch,
            num_kv_splits,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        for batch in reversed(self.sizes):
            for steps in range(self.max_steps, 0, -1):
                for _ in range(2):  # compile kernels outside the capture
                    self._chain(batch, steps)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[(batch, steps)] = self._chain(batch, steps)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(batch, steps)] = graph
        torch.cuda.synchronize()

    def run(
        self,
        outputs: torch.Tensor,
        rows: list[int],
        bases: list[int],
        limits: list[int],
        block_tables: list[list[int]],
        steps: int,
    ) -> torch.Tensor:
        """Replay the chain for len(bases) requests fed ``outputs[rows]``; drafts
        [count, steps], valid until the next replay."""
        count = len(bases)
        batch = next(size for size in self.sizes if size >= count)
        host, at = self.host.numpy(), self.offsets
        host[at["bases"] : at["bases"] + batch] = 1  # padding rows: past their limit
        host[at["limits"] : at["limits"] + batch] = 0
        host[at["bases"] : at["bases"] + count] = bases
        host[at["limits"] : at["limits"] + count] = limits
        host[at["rows"] : at["rows"] + count] = rows
        host[at["width"]], used = pack_block_tables(host, at["tables"], block_tables)
        self.packed[:used].copy_(self.host[:used], non_blocking=True)
        index = self.packed[at["rows"] : at["rows"] + count]
        torch.index_select(outputs, 0, index, out=self.feed[:count])
        self.graphs[(batch, steps)].replay()
        return self.outputs[(batch, steps)][:count]
