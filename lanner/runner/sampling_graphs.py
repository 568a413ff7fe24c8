"""The sampler's race over a decode graph's logits without the eager sampler's launches:
a step whose rows need nothing but the race (greedy, or a temperature and its seed, with
or without a grammar's bitmask) replays one captured graph (inputs in, the race, tokens
out), or, all greedy without a grammar, takes the argmax its decode graph ends with. At
batch 1 on the H200 the eager sampler took 0.34 ms of host time a step of qwen3-0.6b
(0.48 ms under a JSON schema), a third of the step: the host, not the device, set the
pace (W10, 20261201-230826-W10.json); with these graphs the step's host work is ~0.2 ms
of 0.93 (20261204-024809-W10-phases.json)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import numpy as np
import torch

from lanner.kernels.sampling import exponential_race
from lanner.runner.sampler import (
    DeviceSample,
    SamplingRow,
    TokenBitmasks,
    copy_to_host,
    kernel_seeds,
    race_inputs,
)

logger = logging.getLogger(__name__)


def capture_sampling_graphs(
    logits_by_batch: dict[int, torch.Tensor], greedy_by_batch: dict[int, torch.Tensor]
) -> SamplingGraphs | None:
    """The sampling graphs over these decode graphs' logits (and their argmax), or None
    (the eager sampler samples every step) should their capture fail: a slower step,
    not a failed start."""
    try:
        graphs = SamplingGraphs(logits_by_batch, greedy_by_batch)
        graphs.capture()
    except Exception as err:  # noqa: BLE001 - the eager sampler is always there
        logger.warning("capturing the sampling graphs failed (%r); sampling eagerly", err)
        torch.cuda.synchronize()
        return None
    return graphs


def races_only(row: SamplingRow) -> bool:
    """Whether the race alone samples this row: no logprobs, penalties, token
    constraints, min_tokens still to reach, cut (top-k/p, min-p) or drafts."""
    params = row.params
    return (
        params.logprobs is None
        and not params.uses_penalties
        and not params.uses_token_constraints
        and row.num_outputs >= params.min_tokens
        and (params.is_greedy or not params.uses_truncation)
        and not row.draft_token_ids
    )


class SamplingGraphs:
    """Two captured races per decode-graph batch size, over that graph's logits buffer,
    used in turn: each replay copies its turn's pinned host block of inputs in (per row
    its seed, its grammar bitmask row, -1 for none, and its temperature, 0 for greedy),
    races, and copies the tokens out to its turn's pinned host row, so a step is one
    launch. The turns keep a step's inputs and tokens until the step after next: the engine
    reads each step before it launches the one after the next. The step's filled
    bitmask rows are copied into a device buffer of the largest batch's rows first."""

    def __init__(
        self,
        logits_by_batch: dict[int, torch.Tensor],
        greedy_by_batch: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.logits_by_batch = logits_by_batch
        # The decode graphs' own argmax of their logits: an all-greedy step without a
        # grammar takes it and replays nothing here (a graph of its own, replayed after
        # the decode graph, took 8 µs more device time a step than the eager race at W2
        # on the H200; the decode graph's argmax 2-3 µs: 20261204-0251-W2-greedy-graph-ab.json,
        # 20261204-035307-W2-greedy-ab.json).
        self.greedy_by_batch = greedy_by_batch or {}
        largest = max(logits_by_batch)
        self.max_batch = largest
        reference = logits_by_batch[largest]
        device = reference.device
        self.num_words = -(-reference.shape[1] // 32)  # xgrammar's words per bitmask row
        n = largest
        # Seeds, bitmask rows, then temperatures as float32 (in an int64 slot of n).
        self.block = torch.zeros(3 * n, dtype=torch.int64, device=device)
        self.seeds = self.block[:n]
        self.bitmask_rows = self.block[n : 2 * n]
        self.temperatures = self.block[2 * n :].view(torch.float32)[:n]
        self.words = torch.zeros((n, self.num_words), dtype=torch.int32, device=device)
        self.cuda = device.type == "cuda"
        self.host_blocks = [
            torch.zeros(3 * n, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)
        ]
        self.host_tokens = [
            torch.zeros(n, dtype=torch.int64, pin_memory=self.cuda) for _ in range(2)
        ]
        self.issued: list[DeviceSample | None] = [None, None]  # each turn's last sample
        self.turn = 0
        # Which graph a logits tensor belongs to: a step's logits are a view of the
        # buffer's first rows, with its start.
        self.batch_of = {logits.data_ptr(): batch for batch, logits in logits_by_batch.items()}
        if len(self.batch_of) != len(logits_by_batch):
            raise ValueError("two decode graphs share a logits buffer")
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (turn, batch)
        self.tokens: dict[tuple[int, int], torch.Tensor] = {}

    def _run(self, turn: int, batch: int) -> torch.Tensor:
        """What a replay does: inputs in, the race, tokens out."""
        self.block.copy_(self.host_blocks[turn], non_blocking=True)
        tokens = exponential_race(
            self.logits_by_batch[batch],
            self.temperatures[:batch],
            self.seeds[:batch],
            self.words,
            self.bitmask_rows[:batch],
        )
        self.host_tokens[turn][:batch].copy_(tokens, non_blocking=True)
        return tokens

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture each turn's and size's replay (after one launch that compiles, or
        loads, the race's kernels), all in one memory pool: they never run at once. CUDA
        only; elsewhere ``launch`` runs the same steps uncaptured."""
        for host in self.host_blocks:
            host[self.max_batch : 2 * self.max_batch] = -1  # no bitmask rows
        self._run(0, self.max_batch)  # every size's variant: they differ only in rows
        torch.cuda.synchronize()
        pool = None
        for key in itertools.product((0, 1), sorted(self.logits_by_batch, reverse=True)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.tokens[key] = self._run(*key)
            pool = graph.pool() if pool is None else pool
            self.graphs[key] = graph
        torch.cuda.synchronize()

    def launch(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        wait_for_bitmasks: Callable[[], None] | None = None,
    ) -> DeviceSample | None:
        """Sample ``rows`` from a decode graph's logits by its captured race; None (the
        eager sampler's turn) where the logits are not a graph's, or a row needs more
        than the race."""
        batch = self.batch_of.get(logits.data_ptr())
        count = len(rows)
        if batch is None or not 0 < count <= batch or not all(races_only(r) for r in rows):
            return None
        bitmasks = self._bitmasks(rows)
        if bitmasks is False:
            return None
        greedy = [r.params.is_greedy for r in rows]
        if bitmasks is None and all(greedy) and batch in self.greedy_by_batch:
            return self._take_greedy(batch, rows)
        self.turn ^= 1
        turn = self.turn
        self._free_turn(turn)
        self._stage(rows, greedy, batch, bitmasks, wait_for_bitmasks)
        key = (turn, batch)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        else:  # not captured (off CUDA): the same steps, run as they come
            self.tokens[key] = self._run(*key)
        sample = DeviceSample(
            self.tokens[key][:count], self.host_tokens[turn][:count], self._record(), rows, False
        )
        self.issued[turn] = sample
        return sample

    def _take_greedy(self, batch: int, rows: list[SamplingRow]) -> DeviceSample:
        """The decode graph's argmax as the step's tokens, copying to the host."""
        token_ids = self.greedy_by_batch[batch][: len(rows)]
        # Off CUDA a copy stands for the host's: the next step rewrites the graph's own.
        return copy_to_host(token_ids, token_ids if self.cuda else token_ids.clone(), rows)

    def _stage(
        self,
        rows: list[SamplingRow],
        greedy: list[bool],
        batch: int,
        bitmasks: TokenBitmasks | None,
        wait_for_bitmasks: Callable[[], None] | None,
    ) -> None:
        """The rows' inputs into this turn's host block, and the filled bitmask rows
        (once the fill is done) into the device's buffer."""
        count = len(rows)
        host = self.host_blocks[self.turn].numpy()
        n = self.max_batch
        temperatures = host[2 * n :].view(np.float32)
        row_temperatures, seeds = race_inputs(rows, greedy)
        temperatures[:count] = row_temperatures
        temperatures[count:batch] = 0.0  # padding rows: an argmax nobody reads
        if not all(greedy):  # (greedy rows read no seed)
            host[:count] = kernel_seeds(seeds)
        sources = host[n : 2 * n]
        if bitmasks is None:
            sources[:batch] = -1
        else:
            sources[:count] = [
                -1 if r.token_bitmask is None else r.token_bitmask.start for r in rows
            ]
            sources[count:batch] = -1
            if wait_for_bitmasks is not None:
                wait_for_bitmasks()  # the rest of the host's work is done: now the fill
            filled = bitmasks.num_rows
            self.words[:filled].copy_(bitmasks.words[:filled], non_blocking=True)
            bitmasks.copied = self._record()

    def _free_turn(self, turn: int) -> None:
        """Before a turn's buffers are rewritten: its last replay is done (long since:
        the engine read it before this launch), and a sample of it not read yet gets a
        copy of its host tokens to keep."""
        last = self.issued[turn]
        if last is None:
            return
        if last.ready is not None:
            last.ready.synchronize()
        if not last.collected:
            last.host = last.host.clone()

    def _record(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _bitmasks(self, rows: list[SamplingRow]) -> TokenBitmasks | None | bool:
        """The step's one bitmask buffer (None: no row has a grammar), or False where the
        graph cannot read it (rows of more than one buffer, another width, more rows)."""
        found: TokenBitmasks | None = None
        for row in rows:
            if row.token_bitmask is None:
                continue
            bitmasks = row.token_bitmask.bitmasks
            if found is None:
                found = bitmasks
            elif bitmasks is not found:
                return False
        if found is None:
            return None
        words = found.words
        if words.shape[1] != self.num_words or found.num_rows > self.max_batch:
            return False
        return found
