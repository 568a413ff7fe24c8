"""CUDA graphs for decode steps: the model forward plus logits, captured once per bucketed
batch size and replayed with padded inputs, so a decode step costs one launch. A row is
one token over its own context: speculative verify steps run their k + 1 tokens per
request as k + 1 rows (each with its own causal length), so the same graphs replay them."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lanner.kernels import attention_metadata, ops
from lanner.kernels.attention_metadata import AttentionMetadata, shared_prefix_tokens
from lanner.kernels.graph_inputs import GraphInputLayout
from lanner.kernels.paged_attention import choose_num_kv_splits
from lanner.kernels.parallel_compile import refuse_compiles
from lanner.kernels.sampling import exponential_race

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to 256 (as vLLM buckets) and of 32 past
    it (speculative verify rows), up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += list(range(8, min(max_num_seqs, 256) + 1, 8))
    sizes += list(range(288, max_num_seqs + 1, 32))
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


@dataclass
class DeviceTokenIndex:
    """Input rows whose token is still on the device, and where each one is: a sample of
    the step before (overlapped scheduling), then a proposer's drafts (row, column)."""

    previous_rows: list[int] = field(default_factory=list)
    previous_sources: list[int] = field(default_factory=list)
    draft_rows: list[int] = field(default_factory=list)
    draft_sources: list[int] = field(default_factory=list)
    draft_columns: list[int] = field(default_factory=list)

    @property
    def rows(self) -> list[int]:
        return self.previous_rows + self.draft_rows


def stage_inputs(
    packed: np.ndarray,
    layout: GraphInputLayout,
    batch: int,
    token_ids: list[int],
    positions: list[int],
    slots: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    prefix: int,
    device_tokens: DeviceTokenIndex | None = None,
) -> int:
    """Write a step's inputs into the (pinned) packed block (``GraphInputLayout``), rows
    past the real ones as padding, and return how many leading entries it filled: one
    copy of them moves the whole step. The block tables go row after row at the widest
    table's width (the graph's unpack kernel spreads them to the captured stride). Numpy
    views take Python lists at C speed, ~4x faster than building tensors from them for
    256 rows."""
    count = len(token_ids)
    for start in (layout.ids, layout.positions, layout.slots, layout.seq_lens):
        packed[start + count : start + batch] = 0
    packed[layout.slots + count : layout.slots + batch] = -1  # padding rows write no K/V
    packed[layout.ids : layout.ids + count] = token_ids
    packed[layout.positions : layout.positions + count] = positions
    packed[layout.slots : layout.slots + count] = slots
    packed[layout.seq_lens : layout.seq_lens + count] = seq_lens
    if device_tokens is not None:
        rows = device_tokens.rows
        sources = device_tokens.previous_sources + device_tokens.draft_sources
        packed[layout.token_rows : layout.token_rows + len(rows)] = rows
        packed[layout.token_sources : layout.token_sources + len(rows)] = sources
        columns = layout.token_columns + len(device_tokens.previous_rows)
        packed[columns : columns + len(device_tokens.draft_columns)] = device_tokens.draft_columns
    packed[layout.prefix] = prefix
    packed[layout.width], used = pack_block_tables(packed, layout.tables, block_tables)
    return used


def pack_block_tables(
    packed: np.ndarray, start: int, block_tables: list[list[int]]
) -> tuple[int, int]:
    """The tables row after row from ``start``, at the widest one's width; returns (that
    width, the end of what was written). Entries past a row's own blocks are never read
    (attention stops at seq_len), so each row writes only its own blocks."""
    width = max(len(table) for table in block_tables)
    end = start + len(block_tables) * width
    tables = packed[start:end].reshape(len(block_tables), width)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    return width, end


@dataclass(frozen=True)
class StagedInputs:
    """A step's decode-graph inputs staged on the host (``DecodeGraphs.stage``): its
    rows, the graph's batch size, the packed entries filled, the pinned set used, and
    how many input tokens come from the step before's samples and from drafts."""

    count: int
    batch: int
    used: int
    turn: int
    num_previous: int = 0
    num_drafted: int = 0


class DecodeGraphs:
    """Holds the static input buffers and one captured graph per batch size.

    Padding rows read slot -1 (no K/V write) and context length 0 (attention
    writes zeros), so they never touch a live request's cache.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        num_kv_heads: int,
        greedy_tokens: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        device = kv_caches[0].device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        # Every input arrives in one packed int64 block, copied whole; ids, positions
        # and slots are read in place, the rest unpacked by the graph's first kernel.
        self.layout = GraphInputLayout(n, self.max_blocks_per_seq)
        self.packed = torch.zeros(self.layout.size, dtype=torch.long, device=device)
        self.input_ids = self.packed[self.layout.ids : self.layout.ids + n]
        self.positions = self.packed[self.layout.positions : self.layout.positions + n]
        self.slot_mapping = self.packed[self.layout.slots : self.layout.slots + n]
        self.slot_mapping.fill_(-1)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            (n, self.max_blocks_per_seq), dtype=torch.int32, device=device
        )
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_indices = torch.arange(n, dtype=torch.int32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        # Host staging, pinned so the copies into the static buffers are asynchronous;
        # two sets used in turn, so preparing a step never overwrites the inputs of the
        # step before, whose copies may still be queued (overlapped scheduling).
        # (Pinned on CUDA only: the startup kernel count builds these on the meta device.)
        pin = device.type == "cuda"
        self.host_sets = [
            torch.zeros(self.layout.size, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]
        self.turn = 0
        self.max_model_len = max_model_len
        self.num_kv_heads = num_kv_heads
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        # With ``greedy_tokens`` (the sampling rank's graphs) each graph ends with the
        # logits' argmax, which an all-greedy step takes as its tokens
        # (runner/sampling_graphs.py): inside the graph it costs no launch of its own.
        self.with_greedy_tokens = greedy_tokens
        self.greedy_tokens: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_seconds = 0.0  # warm-ups included

    def metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[self.max_model_len] * batch,
            decode_seq_indices=self.seq_indices[:batch],
            prefill_seq_indices=self.seq_indices[:0],
            num_decode=batch,
            num_prefill=0,
            num_kv_splits=choose_num_kv_splits(batch, self.num_kv_heads, self.max_model_len),
            # Graphs large enough for cascade attention carry its kernel; a step without a
            # shared prefix sets the length to 0 and the kernel only writes empty partials.
            shared_prefix_len=self.shared_prefix_len,
            shared_prefix_len_cpu=(
                self.max_model_len - 1 if batch >= attention_metadata.CASCADE_MIN_SEQS else 0
            ),
        )

    def _step(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a graph of ``batch`` rows runs: its inputs unpacked, then ``_forward``."""
        ops.unpack_graph_inputs(
            self.packed,
            self.layout,
            batch,
            self.seq_lens,
            self.shared_prefix_len,
            self.block_tables,
        )
        return self._forward(batch)

    def _forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(
            self.input_ids[:batch], self.positions[:batch], self.metadata(batch), self.kv_caches
        )
        return hidden, self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run_each_size(self) -> None:
        """One forward at each batch size, not captured, in capture's order (under
        kernels.parallel_compile.compile_launches their kernels only compile)."""
        for batch in reversed(self.sizes):
            self._step(batch)

    @torch.inference_mode()
    def capture(self, warm_up: bool = True) -> None:
        """Capture a graph per batch size. ``warm_up`` runs each size once first, which
        compiles (or loads) its kernels and lets cuBLAS set up outside the capture; the
        runner leaves it out when it has compiled and loaded every kernel ahead
        (ModelRunner.startup_kernels; the warm-ups are 35 forwards, ~1 s of an 8B start on
        the H200). Should a capture without it fail, or be about to compile a kernel
        (parallel_compile.refuse_compiles), all are captured again with it."""
        started = time.perf_counter()
        try:
            self._capture_all(warm_up)
        except Exception as err:  # noqa: BLE001 - retried the safe way, then raised
            if warm_up:
                raise
            logger.warning("capturing without warm-ups failed (%r); again with them", err)
            torch.cuda.synchronize()
            self.graphs, self.hidden, self.logits, self.pool = {}, {}, {}, None
            self.greedy_tokens = {}
            self._capture_all(True)
        self.capture_seconds = time.perf_counter() - started
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs%s",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            self.capture_seconds,
            "" if warm_up else " (no warm-ups: kernels compiled ahead)",
        )

    def _capture_all(self, warm_up: bool) -> None:
        # Largest first, so smaller graphs reuse its memory pool.
        for batch in reversed(self.sizes):
            if warm_up:
                _, logits = self._step(batch)
                if self.with_greedy_tokens:
                    exponential_race(logits, None, None)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # Without warm-ups a variant not compiled ahead fails the capture (and all are
            # captured again with them) rather than compiling inside it.
            refuse = contextlib.nullcontext() if warm_up else refuse_compiles("a graph capture")
            with refuse, torch.cuda.graph(graph, pool=self.pool):
                self.hidden[batch], self.logits[batch] = self._step(batch)
                if self.with_greedy_tokens:
                    self.greedy_tokens[batch] = exponential_race(self.logits[batch], None, None)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_batch

    def stage(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        device_tokens: DeviceTokenIndex | None = None,
    ) -> StagedInputs:
        """A step's host half: its inputs written into the next pinned set, for
        ``replay``, with where its tokens still on the device are (``device_tokens``).
        At most one staged step waits for its ``replay`` at a time (the sets are used in
        turn)."""
        count = len(token_ids)
        batch = next(size for size in self.sizes if size >= count)
        self.turn ^= 1
        used = stage_inputs(
            self.host_sets[self.turn].numpy(),
            self.layout,
            batch,
            token_ids,
            positions,
            slots,
            seq_lens,
            block_tables,
            shared_prefix_tokens(block_tables, seq_lens, self.block_size),
            device_tokens,
        )
        index = device_tokens or DeviceTokenIndex()
        return StagedInputs(
            count, batch, used, self.turn, len(index.previous_rows), len(index.draft_rows)
        )

    def replay(
        self,
        staged: StagedInputs,
        previous_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
        sources: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> torch.Tensor:
        """A step's device half, for inputs ``stage`` wrote: replay the smallest graph
        that fits; returns logits [num_seqs, vocab]. Input ids still on the device come
        either as ``previous_tokens`` (rows, ids), or, where ``stage`` was told where they
        are, from ``sources``: (the step before's sampled ids [B], the drafts [R, k])."""
        self.copy_inputs(staged)
        if previous_tokens is not None:
            self.input_ids[previous_tokens[0]] = previous_tokens[1]
        if staged.num_previous or staged.num_drafted:
            self._gather_tokens(staged, *sources)
        return self.launch(staged)

    def copy_inputs(self, staged: StagedInputs) -> None:
        """The staged block to the device: the one copy of a replay."""
        host = self.host_sets[staged.turn]
        self.packed[: staged.used].copy_(host[: staged.used], non_blocking=True)

    def launch(self, staged: StagedInputs) -> torch.Tensor:
        """Replay the graph of ``staged``'s batch over the inputs copied; its logits."""
        self.graphs[staged.batch].replay()
        return self.logits[staged.batch][: staged.count]

    def _gather_tokens(
        self, staged: StagedInputs, previous: torch.Tensor | None, drafts: torch.Tensor | None
    ) -> None:
        """Input ids from the device, indexed by the block's own rows (no other copy)."""

        def part(start: int, begin: int, end: int) -> torch.Tensor:
            return self.packed[start + begin : start + end]

        layout = self.layout
        first, last = staged.num_previous, staged.num_previous + staged.num_drafted
        if first:
            if previous is None:
                raise RuntimeError("a row waits for a previous sample, but none was given")
            sources = part(layout.token_sources, 0, first)
            self.input_ids[part(layout.token_rows, 0, first)] = previous[sources]
        if last > first:
            if drafts is None:
                raise RuntimeError("a row reads device drafts, but none were given")
            sources = part(layout.token_sources, first, last)
            columns = part(layout.token_columns, first, last)
            self.input_ids[part(layout.token_rows, first, last)] = drafts[sources, columns]
