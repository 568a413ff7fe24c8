"""Property-based tests: random arrivals, aborts, cache resets and memory pressure never
break the scheduler's, the block pool's or the prefix cache's accounting."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.engine.request import FinishReason, Request, RequestStatus
from lanner.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lanner.memory.block_pool import BlockPool
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.sampling_params import SamplingParams

BLOCK_SIZE = 4
# Prompts are cut from these, so that requests share prefixes the cache can reuse.
BASES = [list(range(100, 160)), [7] * 60, list(range(300, 240, -1))]


class KVContents:
    """A stand-in for the KV tensors: what each (block, slot) was computed from.

    The K/V at position p depends on the tokens at 0..p, so a slot stores that
    prefix. Reading a request's computed positions back checks that cache hits
    hand out the right blocks and that no block was reused while still in use."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def check_and_write(self, manager: KVCacheManager, request: Request, num_new: int) -> None:
        table = manager.get_block_table(request.request_id)
        tokens = request.token_ids(0, request.num_computed_tokens + num_new)
        for position in range(request.num_computed_tokens):
            slot = (table[position // BLOCK_SIZE], position % BLOCK_SIZE)
            assert self.slots.get(slot) == tuple(tokens[: position + 1])
        for position in range(request.num_computed_tokens, len(tokens)):
            block = table[position // BLOCK_SIZE]
            # only the request's own, uncached block may be written
            assert manager.pool.ref_count(block) == 1
            self.slots[(block, position % BLOCK_SIZE)] = tuple(tokens[: position + 1])


def check_pool(manager: KVCacheManager) -> None:
    """Each block's references are exactly its tables plus the cache's own; a cached
    block sits under the tokens it holds; the free list is exactly the rest."""
    pool = manager.pool
    holders = Counter(b for table in manager.block_tables.values() for b in table)
    cached = manager.prefix_cache.cached_block_ids() if manager.prefix_cache else set()
    for block in range(pool.num_blocks):
        assert pool.ref_count(block) == holders[block] + (block in cached)
    free = list(pool._free)
    assert len(free) == len(set(free)) == pool.num_blocks - len(set(holders) | cached)
    assert all(pool.ref_count(b) == 0 for b in free)


def check_invariants(scheduler: Scheduler, out: SchedulerOutput) -> None:
    manager = scheduler.kv_manager
    check_pool(manager)
    assert out.num_batched_tokens <= scheduler.config.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for scheduled in out.scheduled:
        request = scheduled.request
        assert request.status == RequestStatus.RUNNING
        assert scheduled.num_new_tokens >= 1
        needed = request.num_computed_tokens + scheduled.num_new_tokens
        assert len(manager.get_block_table(request.request_id)) * BLOCK_SIZE >= needed
    for request in scheduler.waiting:
        assert not manager.get_block_table(request.request_id)
        assert request.num_computed_tokens == 0
    assert set(manager.block_tables) <= {r.request_id for r in scheduler.running}


def run_step(
    scheduler: Scheduler, contents: KVContents | None = None, rng: random.Random | None = None
) -> SchedulerOutput:
    """What the engine core does around a model step; the sampled token is 1, or
    drawn from a few values when ``rng`` is given (so outputs can share blocks too)."""
    out = scheduler.schedule()
    check_invariants(scheduler, out)
    if contents is not None:
        for scheduled in out.scheduled:
            contents.check_and_write(
                scheduler.kv_manager, scheduled.request, scheduled.num_new_tokens
            )
    scheduler.update_after_step(out)
    check_pool(scheduler.kv_manager)
    for scheduled in out.scheduled:
        if scheduled.request.num_computed_tokens == scheduled.request.num_tokens:
            scheduled.request.output_token_ids.append(rng.choice([1, 2]) if rng else 1)
            stop = scheduler.check_stop(scheduled.request)
            if stop is not None:
                scheduler.finish_request(scheduled.request.request_id, *stop)
    return out


actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(1, 40),
            st.integers(1, 12),
            st.integers(0, 3),
            st.integers(1, 3),
            st.integers(0, len(BASES) - 1),
            st.integers(0, 40),
        ),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("reset")),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(
    actions=actions,
    num_blocks=st.integers(12, 60),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 48),
    policy=st.sampled_from(["fcfs", "priority", "lpm"]),
    enable_prefix_caching=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_workloads_keep_accounting_and_finish(
    actions: list,
    num_blocks: int,
    max_num_seqs: int,
    budget: int,
    policy: str,
    enable_prefix_caching: bool,
    seed: int,
) -> None:
    config = SchedulerConfig(
        max_model_len=num_blocks * BLOCK_SIZE,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        policy=policy,
    )
    manager = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching)
    scheduler = Scheduler(config, manager)
    contents = KVContents()
    rng = random.Random(seed)
    added: list[str] = []
    for action in actions:
        if action[0] == "add":
            _, prompt_len, max_tokens, priority, n, base, shared = action
            # A shared head from one base, then a tail of its own.
            shared = min(shared, prompt_len)
            prompt = BASES[base][:shared] + [len(added) + 1000] * (prompt_len - shared)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            group = f"r{len(added)}"
            for i in range(n):  # n > 1 siblings share the first one's prompt blocks
                rid = f"{group}#{i}"
                scheduler.add_request(
                    Request(
                        rid,
                        prompt,
                        params,
                        priority=priority,
                        prefix_source_id=f"{group}#0" if i else None,
                    )
                )
                added.append(rid)
        elif action[0] == "abort" and added:
            scheduler.finish_request(added[action[1] % len(added)], FinishReason.ABORT)
        elif action[0] == "step":
            for _ in range(action[1]):
                run_step(scheduler, contents, rng)
        elif action[0] == "reset":
            emptied = manager.reset_prefix_cache()
            check_pool(manager)
            assert emptied == (manager.num_cached_blocks == 0)
    # Everything left must finish in bounded time (no deadlock, no livelock).
    for _ in range(2000):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler, contents, rng)
    assert scheduler.num_unfinished == 0
    assert not manager.block_tables
    assert manager.num_free_blocks + manager.num_cached_blocks == num_blocks
    assert manager.reset_prefix_cache()
    assert manager.num_free_blocks == num_blocks


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["take", "share", "free"]), st.integers(0, 20)), max_size=80)
)
def test_block_pool_never_leaks_or_double_frees(ops: list) -> None:
    pool = BlockPool(16)
    held: list[int] = []  # one entry per reference we hold
    for op, amount in ops:
        if op == "take" and amount <= pool.num_free_blocks:
            held += pool.allocate(amount)
        elif op == "share" and held:
            block = held[amount % len(held)]
            pool.share([block])
            held.append(block)
        elif op == "free" and held:
            block = held.pop(amount % len(held))
            pool.free([block])
        counts = Counter(held)
        assert all(pool.ref_count(b) == counts[b] for b in range(16))
        assert pool.num_free_blocks == 16 - len(counts)
    pool.free(held)
    assert pool.num_free_blocks == 16
