"""Property-based tests: random arrivals, aborts and memory pressure never break the
scheduler's or the block pool's accounting."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.engine.request import FinishReason, Request, RequestStatus
from lanner.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lanner.memory.block_pool import BlockPool
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.sampling_params import SamplingParams

BLOCK_SIZE = 4


def check_invariants(scheduler: Scheduler, out: SchedulerOutput) -> None:
    manager = scheduler.kv_manager
    pool = manager.pool
    holders = Counter(b for table in manager.block_tables.values() for b in table)
    for block in range(pool.num_blocks):
        assert pool.ref_count(block) == holders[block]
    free = list(pool._free)
    assert len(free) == len(set(free)) == pool.num_blocks - len(holders)
    assert all(pool.ref_count(b) == 0 for b in free)
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


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """What the engine core does around a model step, with token 1 always sampled."""
    out = scheduler.schedule()
    check_invariants(scheduler, out)
    scheduler.update_after_step(out)
    for scheduled in out.scheduled:
        if scheduled.request.num_computed_tokens == scheduled.request.num_tokens:
            scheduled.request.output_token_ids.append(1)
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
        ),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    actions=actions,
    num_blocks=st.integers(12, 60),
    max_num_seqs=st.integers(1, 8),
    budget=st.integers(1, 48),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_random_workloads_keep_accounting_and_finish(
    actions: list, num_blocks: int, max_num_seqs: int, budget: int, policy: str
) -> None:
    config = SchedulerConfig(
        max_model_len=num_blocks * BLOCK_SIZE,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        policy=policy,
    )
    scheduler = Scheduler(config, KVCacheManager(num_blocks, BLOCK_SIZE))
    added: list[str] = []
    for action in actions:
        if action[0] == "add":
            _, prompt_len, max_tokens, priority, n = action
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            base = f"r{len(added)}"
            for i in range(n):  # n > 1 siblings share the first one's prompt blocks
                rid = f"{base}#{i}"
                scheduler.add_request(
                    Request(
                        rid,
                        list(range(prompt_len)),
                        params,
                        priority=priority,
                        prefix_source_id=f"{base}#0" if i else None,
                    )
                )
                added.append(rid)
        elif action[0] == "abort" and added:
            scheduler.finish_request(added[action[1] % len(added)], FinishReason.ABORT)
        elif action[0] == "step":
            for _ in range(action[1]):
                run_step(scheduler)
    # Everything left must finish in bounded time (no deadlock, no livelock).
    for _ in range(2000):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler)
    assert scheduler.num_unfinished == 0
    assert scheduler.kv_manager.num_free_blocks == num_blocks
    assert not scheduler.kv_manager.block_tables


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
