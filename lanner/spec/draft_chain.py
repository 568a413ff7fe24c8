"""The draft model's one-token steps in one piece: from each drafting request's first
draft (still on the device), feed draft j and take the argmax as draft j + 1, for
j = 1 .. steps, with positions, cache slots and context lengths derived on the device
from each row's start. On CUDA one graph per (row bucket, number of steps) replays the
whole chain in one launch, with no host work or sync between the steps; elsewhere (the
CPU, enforce_eager) the same steps run eagerly.

Only greedy drafting goes through the chain (the drafts are point masses); a request
that samples its drafts, or whose drafts feed penalties on the host, takes the draft
model's step-by-step path.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lanner.kernels.attention_metadata import AttentionMetadata
from lanner.kernels.paged_attention import choose_num_kv_splits
from lanner.runner.sampler import greedy_tokens

logger = logging.getLogger(__name__)


def chain_sizes(max_rows: int) -> list[int]:
    """Row buckets the chain graphs are captured for: powers of two up to max_rows (a
    draft step's cost hardly grows with its rows, so padding to the next power is cheap)."""
    sizes = [1]
    while sizes[-1] < max_rows:
        sizes.append(min(2 * sizes[-1], max_rows))
    return sizes


def chain_step_inputs(
    starts: torch.Tensor,
    limits: torch.Tensor,
    block_tables: torch.Tensor,
    step: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, cache slots and context lengths of chain step ``step`` (1-based) for
    rows that feed their draft ``step`` at position start + step. A row past its
    ``limit`` (it drafts fewer tokens) or a padding row (limit 0) runs at position 0,
    writes no K/V (slot -1) and attends to nothing (length 0)."""
    live = limits > step
    # Rows that do not feed run at position 0, inside every table and rotary cache.
    positions = torch.where(live, starts + step, 0)
    blocks = block_tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1).long()
    slots = torch.where(live, blocks * block_size + positions % block_size, -1)
    seq_lens = torch.where(live, positions + 1, 0).to(torch.int32)
    return positions, slots, seq_lens


class DraftChain:
    """Static buffers and captured graphs of the draft's chain; ``run`` drafts."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_rows: int,
        max_model_len: int,
        num_kv_heads: int,
        max_steps: int,
        use_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_steps = max_steps
        self.max_model_len = max_model_len
        self.num_kv_heads = num_kv_heads
        self.sizes = chain_sizes(max_rows)
        device = kv_caches[0].device
        n = self.sizes[-1]
        self.max_blocks_per_seq = -(-(max_model_len + max_steps + 1) // block_size)
        # Inputs staged by the host each run.
        self.starts = torch.zeros(n, dtype=torch.long, device=device)
        self.limits = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(
            (n, self.max_blocks_per_seq), dtype=torch.int32, device=device
        )
        # Per step, derived on the device.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_indices = torch.arange(n, dtype=torch.int32, device=device)
        self.no_shared_prefix = torch.zeros(1, dtype=torch.int32, device=device)
        # [rows, 1 + max_steps]: column 0 the first draft, column j draft j + 1.
        self.out = torch.full((n, 1 + max_steps), -1, dtype=torch.long, device=device)
        self.use_graphs = use_graphs and device.type == "cuda"
        pinned = self.use_graphs
        # Two staging sets used in turn: the copies of one run may still be queued
        # while the host stages the next.
        self.host_sets = [
            torch.zeros((2, n), dtype=torch.long, pin_memory=pinned) for _ in range(2)
        ]
        self.table_sets = [
            torch.zeros(n * self.max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned)
            for _ in range(2)
        ]
        self.turn = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _metadata(self, batch: int, host_seq_lens: list[int] | None) -> AttentionMetadata:
        """Decode metadata over the static buffers. Under a graph the host lengths are
        an upper bound (the kernels read the device's); eagerly they are exact (the CPU's
        reference attention loops over them)."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=host_seq_lens or [self.max_model_len] * batch,
            decode_seq_indices=self.seq_indices[:batch],
            prefill_seq_indices=self.seq_indices[:0],
            num_decode=batch,
            num_prefill=0,
            num_kv_splits=(
                choose_num_kv_splits(batch, self.num_kv_heads, self.max_model_len)
                if host_seq_lens is None
                else None
            ),
            shared_prefix_len=self.no_shared_prefix,
            shared_prefix_len_cpu=0,
        )

    def _steps(self, batch: int, num_steps: int, host: list[list[int]] | None) -> None:
        """Chain steps 1..num_steps over the first ``batch`` rows (``host``: per step the
        rows' exact context lengths, for eager runs)."""
        for step in range(1, num_steps + 1):
            positions, slots, seq_lens = chain_step_inputs(
                self.starts[:batch],
                self.limits[:batch],
                self.block_tables[:batch],
                step,
                self.block_size,
            )
            self.positions[:batch].copy_(positions)
            self.slot_mapping[:batch].copy_(slots)
            self.seq_lens[:batch].copy_(seq_lens)
            metadata = self._metadata(batch, host[step - 1] if host is not None else None)
            hidden = self.model(
                self.input_ids[:batch], self.positions[:batch], metadata, self.kv_caches
            )
            drafts = greedy_tokens(self.model.compute_logits(hidden))
            self.out[:batch, step].copy_(torch.where(self.limits[:batch] > step, drafts, -1))
            self.input_ids[:batch].copy_(drafts)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        started = time.perf_counter()
        for batch in reversed(self.sizes):  # largest first: the others reuse its pool
            for num_steps in range(self.max_steps, 0, -1):
                self.limits.zero_()  # capture runs write no K/V
                for _ in range(2):  # warm up: compile kernels outside the capture
                    self._steps(batch, num_steps, None)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._steps(batch, num_steps, None)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(batch, num_steps)] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d draft chain CUDA graphs (rows %d..%d, 1..%d steps) in %.1fs",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            self.max_steps,
            time.perf_counter() - started,
        )

    def can_run(self, num_rows: int, num_steps: int) -> bool:
        return 0 < num_rows <= self.sizes[-1] and 0 < num_steps <= self.max_steps

    @torch.inference_mode()
    def run(
        self,
        first_drafts: torch.Tensor,
        starts: list[int],
        lengths: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """[rows, max(lengths)] drafts (-1 past each row's length) of rows whose first
        draft is ``first_drafts[row]`` (on the device) at position ``starts[row] + 1``:
        row r feeds draft j at position starts[r] + j, for j < lengths[r]; its block table
        covers those positions."""
        count = len(starts)
        num_steps = max(lengths) - 1
        graph = self.graphs.get((next(s for s in self.sizes if s >= count), num_steps))
        # A graph runs its bucket's padded rows; eagerly only the real ones run.
        batch = next(s for s in self.sizes if s >= count) if graph is not None else count
        self.turn ^= 1
        host, host_tables = self.host_sets[self.turn], self.table_sets[self.turn]
        values = host.numpy()
        values[:, :batch] = 0  # padding rows: limit 0
        values[0, :count] = starts
        values[1, :count] = lengths
        width = max(len(table) for table in block_tables)
        tables = host_tables.numpy()[: count * width].reshape(count, width)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        self.starts[:batch].copy_(host[0, :batch], non_blocking=True)
        self.limits[:batch].copy_(host[1, :batch], non_blocking=True)
        self.block_tables[:count, :width].copy_(
            host_tables[: count * width].view(count, width), non_blocking=True
        )
        self.input_ids[:count].copy_(first_drafts)
        self.out[:count, 0].copy_(first_drafts)
        if graph is not None:
            graph.replay()
        elif num_steps > 0:
            exact = [
                [start + step + 1 if step < length else 0 for start, length in
                 zip(starts, lengths, strict=True)]
                for step in range(1, num_steps + 1)
            ]  # fmt: skip
            self._steps(batch, num_steps, exact)
        return self.out[:count, : num_steps + 1]
