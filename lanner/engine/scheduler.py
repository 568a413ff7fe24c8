"""Iteration-level scheduler: each step, which requests run and how many tokens each feeds.

Every request keeps ``num_computed_tokens``. A step hands out a token budget:
running requests first (one token for a decode, the next chunk of an unfinished
prefill), then waiting ones, which first take whatever prefix of their tokens the
prefix cache holds. Decodes and prefill chunks share one batch. When the KV pool
runs dry, the lowest-priority, newest running request is preempted: its blocks are
freed (its full ones stay cached) and it recomputes later, producing the same output.

With speculative decoding a decoding request is scheduled for 1 + its draft length
tokens (slots for the drafts counted in the budget and allocated); once verified, only
the accepted ones count as computed and blocks past them go back to the pool.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from lanner.engine.request import FinishReason, Request, RequestStatus
from lanner.memory.kv_cache_manager import KVCacheManager

# fcfs: arrival order. priority: lower `priority` first, then arrival. lpm: longest
# cached prefix first among waiting requests (more reuse), then arrival.
SCHEDULING_POLICIES = ("fcfs", "priority", "lpm")


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy {self.policy!r} is unknown; use one of {SCHEDULING_POLICIES}"
            )
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # fed this step, starting at request.num_computed_tokens
    # The last num_draft_tokens of them are slots for proposed tokens (speculation); the
    # proposer may fill fewer (the step's chunk says how many).
    num_draft_tokens: int = 0

    @property
    def num_known_new_tokens(self) -> int:
        """The fed tokens that are the request's own (not proposals)."""
        return self.num_new_tokens - self.num_draft_tokens

    @property
    def samples(self) -> bool:
        """Does this chunk reach the end of the known tokens, so a new token follows?"""
        request = self.request
        return request.num_computed_tokens + self.num_known_new_tokens == request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# (number of running requests) -> draft tokens each decoding request may propose this
# step (asked once a step: requests speculate together or not at all).
DraftLength = Callable[[int], int]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        draft_length: DraftLength | None = None,
    ) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.draft_length = draft_length
        self.requests: dict[str, Request] = {}
        # Both lists stay sorted by `_order`: oldest (or most urgent) first, so the
        # preemption victim is always the last running request.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def _order(self, request: Request) -> tuple[float, ...]:
        if self.config.policy == "priority":
            return (request.priority, request.arrival_time)
        return (request.arrival_time,)

    def _insert(self, queue: list[Request], request: Request) -> None:
        bisect.insort(queue, request, key=self._order)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        if not isinstance(request.request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request.request_id).__name__}")
        if not isinstance(request.priority, int) or isinstance(request.priority, bool):
            raise ValueError(f"priority must be an int, got {request.priority!r}")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        # Queue first: should ordering fail, the request is in neither structure.
        self._insert(self.waiting, request)
        self.requests[request.request_id] = request

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        max_drafts = self.draft_length(len(self.running)) if self.draft_length is not None else 0
        # 1. Running requests, most urgent first.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_pending_outputs and self._at_length_limit(request):
                index += 1
                continue
            missing = request.num_tokens - request.num_computed_tokens
            num_new = min(missing, budget)
            num_draft = 0
            if max_drafts and num_new == missing:
                num_draft = self._num_draft_tokens(request, min(max_drafts, budget - num_new))
            total = request.num_computed_tokens + num_new + num_draft
            while not self.kv_manager.allocate_slots(request.request_id, total):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it preempted itself: every request after it is gone too
            out.scheduled.append(ScheduledRequest(request, num_new + num_draft, num_draft))
            budget -= num_new + num_draft
            index += 1
        # 2. Waiting requests, unless memory was just short.
        if out.preempted:
            return out
        if self.config.policy == "lpm":
            self._sort_waiting_by_cached_prefix()
        index = 0
        while index < len(self.waiting) and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[index]
            if not self._prefix_source_ready(request):
                index += 1  # a sibling still computing the shared prompt; let others pass
                continue
            if request.grammar is not None and (
                not request.grammar.ready or request.grammar.error is not None
            ):
                index += 1  # its grammar still compiles (off the loop); let others pass
                continue
            self._reuse_computed_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            total = request.num_computed_tokens + num_new
            if not self.kv_manager.allocate_slots(request.request_id, total):
                if request.num_computed_tokens:  # undo the sharing
                    self.kv_manager.free(request.request_id)
                    request.num_computed_tokens = 0
                break
            self.kv_manager.record_prefix_lookup(request.num_tokens, request.num_computed_tokens)
            self.waiting.pop(index)
            request.status = RequestStatus.RUNNING
            self._insert(self.running, request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out

    def _num_draft_tokens(self, request: Request, budget: int) -> int:
        """Draft slots for a request about to sample: up to ``budget`` (what the proposer
        policy asks, within the token budget), and no more than can be used before
        max_tokens or max_model_len (the drafts plus the token after them must fit)."""
        if request.num_pending_outputs or budget <= 0:
            return 0  # its last token is still in flight: nothing to propose from
        room = self.config.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return max(0, min(budget, room))

    def accept_draft_tokens(self, request: Request, num_accepted: int) -> None:
        """After verification: the first ``num_accepted`` drafts join the computed tokens
        (their K/V is the target's own); the blocks past them are released."""
        request.num_computed_tokens += num_accepted
        self.kv_manager.trim_slots(request.request_id, request.num_computed_tokens)

    def _prefix_source_ready(self, request: Request) -> bool:
        """n > 1 siblings wait until the first one has computed the shared prompt,
        unless that one has stopped running (then they compute it themselves)."""
        source = self.requests.get(request.prefix_source_id or "")
        if source is None or request.num_preemptions or source.num_preemptions:
            return True
        if source.status == RequestStatus.WAITING:
            return False
        return source.status != RequestStatus.RUNNING or (
            source.num_computed_tokens >= source.num_prompt_tokens
        )

    def _cacheable_prefix(self, request: Request) -> list[int]:
        """The tokens whose K/V the request may take from the prefix cache: all but the
        last known one (its logits give the next sample), and none whose prompt
        logprob is still owed (those positions must run)."""
        limit = request.num_tokens - 1
        if request.sampling_params.prompt_logprobs is not None:
            limit = min(limit, len(request.prompt_logprobs))
        return request.token_ids(0, limit)

    def _reuse_computed_prefix(self, request: Request) -> None:
        """Start a request being admitted on K/V already computed: the prefix cache's
        blocks or, with caching off, an n > 1 sibling's prompt blocks."""
        if self.kv_manager.enable_prefix_caching:
            request.num_computed_tokens = self.kv_manager.share_cached_prefix(
                request.request_id, self._cacheable_prefix(request)
            )
        else:
            self._share_sibling_prefix(request)

    def _sort_waiting_by_cached_prefix(self) -> None:
        """lpm: longest cached prefix first, ties by arrival. Lengths change as blocks
        are cached and evicted, so the queue is re-sorted every step."""
        cached = {
            request.request_id: self.kv_manager.cached_prefix_length(
                self._cacheable_prefix(request)
            )
            for request in self.waiting
        }
        self.waiting.sort(key=lambda r: (-cached[r.request_id], r.arrival_time))

    def _cache_computed_blocks(self, request: Request) -> None:
        # Blocks holding a token still in flight wait until the host has read it.
        self.kv_manager.cache_full_blocks(
            request.request_id,
            min(request.num_computed_tokens, request.num_known_tokens),
            request.token_ids,
        )

    def _share_sibling_prefix(self, request: Request) -> None:
        source = self.requests.get(request.prefix_source_id or "")
        if source is None or source.status != RequestStatus.RUNNING or request.num_preemptions:
            return
        if request.num_computed_tokens or self.kv_manager.get_block_table(request.request_id):
            return
        # Leave at least the last prompt token to compute: its logits give the first
        # sample. Share only what the source has computed: a resumed source may hold
        # blocks it is still filling in this very step.
        request.num_computed_tokens = self.kv_manager.share_prefix(
            source.request_id,
            request.request_id,
            min(request.num_prompt_tokens - 1, source.num_computed_tokens),
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._cache_computed_blocks(request)  # so that resuming finds them
        self.kv_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self._insert(self.waiting, request)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Count this step's tokens as computed (call before appending sampled tokens)
        and cache the blocks they filled, so requests admitted next step can share them."""
        for scheduled in out.scheduled:
            # Drafts count once verified (accept_draft_tokens).
            scheduled.request.num_computed_tokens += scheduled.num_known_new_tokens
            self._cache_computed_blocks(scheduled.request)

    def finish_request(
        self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a request (finished or aborted) and free everything it holds.
        Returns it, or None when it was unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
        queue.remove(request)
        self._cache_computed_blocks(request)
        self.kv_manager.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        return request

    def check_stop(self, request: Request) -> tuple[FinishReason, int | str | None] | None:
        """Whether the newest token the host knows ends the request, and why (tokens of
        steps still in flight do not count yet)."""
        params = request.sampling_params
        num_outputs = request.num_output_tokens - request.num_pending_outputs
        last = request.output_token_ids[num_outputs - 1]
        if num_outputs >= params.min_tokens:
            if not params.ignore_eos and last in request.eos_token_ids:
                return FinishReason.STOP, None
            if last in params.stop_token_ids:
                return FinishReason.STOP, last
        if params.max_tokens is not None and num_outputs >= params.max_tokens:
            return FinishReason.LENGTH, None
        if request.num_known_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None

    def _at_length_limit(self, request: Request) -> bool:
        """A request whose in-flight token already reaches max_tokens or max_model_len
        gets no further step; it finishes when that token is read."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens >= max_tokens:
            return True
        return request.num_tokens >= self.config.max_model_len
