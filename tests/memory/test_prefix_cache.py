"""The prefix cache's radix tree and its use by KVCacheManager: matching, insertion,
LRU eviction of unused leaves only, resets, counters, and reference-count accounting."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.memory.block_pool import BlockPool
from lanner.memory.kv_cache_manager import KVCacheManager
from lanner.memory.prefix_cache import PrefixCache

BLOCK_SIZE = 4


def cache_with_pool(num_blocks: int = 16) -> tuple[PrefixCache, BlockPool]:
    pool = BlockPool(num_blocks)
    return PrefixCache(pool, BLOCK_SIZE), pool


def test_match_returns_longest_cached_prefix_of_full_blocks() -> None:
    cache, pool = cache_with_pool()
    blocks = pool.allocate(3)
    cache.insert(list(range(12)), blocks)
    assert cache.num_cached_blocks == 3
    assert all(pool.ref_count(b) == 2 for b in blocks)  # the request's and the cache's
    assert cache.match(list(range(14))) == blocks
    assert cache.match(list(range(12))) == blocks
    assert cache.match(list(range(11))) == blocks[:2]  # a partial block never matches
    assert cache.match([0, 1, 2, 3, 4, 5, 6, 99, 8]) == blocks[:1]
    assert cache.match([1, 2, 3, 4]) == []
    assert cache.match([]) == []


def test_duplicate_blocks_are_not_cached() -> None:
    cache, pool = cache_with_pool()
    first = pool.allocate(2)
    cache.insert(list(range(8)), first)
    second = pool.allocate(3)
    cache.insert(list(range(12)), second)
    # The first two blocks were cached already; only the new third block joins.
    assert cache.match(list(range(12))) == [*first, second[2]]
    assert [pool.ref_count(b) for b in second] == [1, 1, 2]
    assert cache.num_cached_blocks == 3


def test_insert_continues_below_a_returned_node() -> None:
    cache, pool = cache_with_pool()
    blocks = pool.allocate(3)
    node = cache.insert(list(range(4)), blocks[:1])
    node = cache.insert(list(range(4, 12)), blocks[1:], parent=node)
    assert cache.match(list(range(12))) == blocks
    with pytest.raises(ValueError, match="whole blocks"):
        cache.insert(list(range(12, 18)), pool.allocate(2), parent=node)


def test_lru_leaves_go_first_and_blocks_in_use_never() -> None:
    cache, pool = cache_with_pool()
    a = pool.allocate(2)
    cache.insert([1] * 8, a)
    b = pool.allocate(2)
    cache.insert([2] * 8, b)
    c = pool.allocate(2)
    cache.insert([3] * 8, c)
    pool.free(a + b)  # requests a and b ended; c still runs
    cache.match([1] * 8)  # a is now more recently used than b
    assert cache.evict(1) == 1
    assert cache.match([2] * 8) == b[:1]  # b's leaf went first, not its parent
    assert cache.evict(10) == 3  # b's root block, then a's leaf and root
    assert cache.match([3] * 8) == c  # in use: untouched
    assert cache.stats.evicted_blocks == 4
    assert pool.num_free_blocks == 16 - 2
    pool.free(c)
    assert cache.evict(10) == 2
    assert pool.num_free_blocks == 16 and cache.num_cached_blocks == 0


def test_unused_parent_waits_for_its_used_child() -> None:
    cache, pool = cache_with_pool()
    cached = pool.allocate(1)
    cache.insert([5] * 4, cached)
    pool.free(cached)  # only the cache holds it now
    # Another request computed its own copy of that block, then a child below it.
    own = pool.allocate(2)
    node = cache.insert([5] * 4, own[:1])  # a duplicate: the cached block stays
    cache.insert([6] * 4, own[1:], parent=node)
    assert cache.evict(5) == 0  # the parent is unused but has a child in use
    assert not cache.reset()
    pool.free(own)
    assert cache.reset()
    assert pool.num_free_blocks == 16


def test_many_reuses_without_eviction_keep_eviction_exact() -> None:
    # Each reuse leaves a stale eviction candidate behind; they must neither pile up
    # nor confuse the LRU order.
    cache, pool = cache_with_pool(8)
    kept = pool.allocate(2)
    cache.insert([1] * 8, kept)
    pool.free(kept)
    other = pool.allocate(1)
    cache.insert([2] * 4, other)
    pool.free(other)
    for _ in range(500):
        blocks = cache.match([1] * 8)
        pool.share(blocks)
        pool.free(blocks)
    assert len(cache._candidates) <= 4 * cache.num_cached_blocks + 64
    assert cache.evict(1) == 1
    assert cache.match([2] * 4) == []  # the least recently used went first
    assert cache.evict(5) == 2 and pool.num_free_blocks == 8


def test_reset_drops_unused_blocks_and_reports_leftovers() -> None:
    cache, pool = cache_with_pool()
    used = pool.allocate(2)
    cache.insert(list(range(8)), used)
    done = pool.allocate(1)
    cache.insert([9] * 4, done)
    pool.free(done)
    assert not cache.reset()  # `used` still runs
    assert cache.num_cached_blocks == 2 and pool.ref_count(done[0]) == 0
    assert cache.stats.evicted_blocks == 0  # a reset is not an eviction
    pool.free(used)
    assert cache.reset()
    assert pool.num_free_blocks == 16


def test_manager_evicts_only_when_the_pool_runs_short() -> None:
    manager = KVCacheManager(6, BLOCK_SIZE)
    assert manager.allocate_slots("a", 16)
    manager.cache_full_blocks("a", 16, lambda s, e: list(range(s, e)))
    manager.free("a")
    assert manager.num_cached_blocks == 4 and manager.num_free_blocks == 2
    assert manager.usage == 0.0  # blocks only the cache keeps count as free
    assert manager.allocate_slots("b", 8)  # fits in the free list: nothing evicted
    assert manager.num_cached_blocks == 4
    assert manager.allocate_slots("c", 12)  # needs 3 more: three evicted
    assert manager.num_cached_blocks == 1
    assert manager.prefix_cache is not None and manager.prefix_cache.stats.evicted_blocks == 3
    assert not manager.allocate_slots("d", 8)  # the last cached block cannot cover two
    assert "d" not in manager.block_tables


def test_blocks_count_as_used_when_their_request_ends() -> None:
    manager = KVCacheManager(8, BLOCK_SIZE)
    long, short = [1] * 8, [2] * 8
    manager.allocate_slots("long", 8)
    manager.cache_full_blocks("long", 8, lambda s, e: long[s:e])  # cached first ...
    manager.allocate_slots("short", 8)
    manager.cache_full_blocks("short", 8, lambda s, e: short[s:e])
    manager.free("short")
    manager.free("long")  # ... but released last, so kept longest
    assert manager.prefix_cache is not None
    assert manager.prefix_cache.evict(2) == 2
    assert manager.cached_prefix_length(long) == 8
    assert manager.cached_prefix_length(short) == 0


def test_manager_shares_cached_prefix_and_caches_incrementally() -> None:
    manager = KVCacheManager(16, BLOCK_SIZE)
    tokens = list(range(100, 120))
    assert manager.share_cached_prefix("a", tokens) == 0
    assert manager.allocate_slots("a", 10)
    manager.cache_full_blocks("a", 10, lambda s, e: tokens[s:e])  # 2 full blocks
    assert manager.num_cached_blocks == 2
    assert manager.allocate_slots("a", 20)
    manager.cache_full_blocks("a", 19, lambda s, e: tokens[s:e])
    assert manager.num_cached_blocks == 4
    assert manager.cached_prefix_length(tokens) == 16
    hit = manager.share_cached_prefix("b", tokens[:19])
    assert hit == 16
    assert manager.get_block_table("b") == manager.get_block_table("a")[:4]
    assert all(manager.pool.ref_count(b) == 3 for b in manager.get_block_table("b"))
    manager.record_prefix_lookup(20, hit)
    stats = manager.prefix_cache_stats
    assert stats is not None and stats.hit_tokens == 16 and stats.hit_rate == 0.8
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks + manager.num_cached_blocks == 16
    assert manager.reset_prefix_cache() and manager.num_free_blocks == 16


def test_insert_cursor_survives_eviction_of_a_cached_twin() -> None:
    manager = KVCacheManager(8, BLOCK_SIZE)
    tokens = [3] * 4 + [4] * 4 + [5] * 4
    manager.allocate_slots("old", 4)
    manager.cache_full_blocks("old", 4, lambda s, e: tokens[s:e])
    manager.free("old")
    # "new" computed its own first block (a twin of the cached one) ...
    manager.allocate_slots("new", 8)
    manager.cache_full_blocks("new", 4, lambda s, e: tokens[s:e])
    # ... then the twin is evicted; new's next block must still land at its path.
    manager.reset_prefix_cache()
    manager.cache_full_blocks("new", 8, lambda s, e: tokens[s:e])
    assert manager.prefix_cache is not None
    assert manager.prefix_cache.match(tokens) == manager.get_block_table("new")


def test_caching_off_keeps_nothing() -> None:
    manager = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    assert manager.prefix_cache is None and manager.prefix_cache_stats is None
    assert manager.allocate_slots("a", 16)
    manager.cache_full_blocks("a", 16, lambda s, e: list(range(s, e)))
    assert manager.share_cached_prefix("b", list(range(16))) == 0
    manager.free("a")
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 0
    assert manager.reset_prefix_cache()


# Tokens from a tiny alphabet, so random sequences share prefixes often.
sequences = st.lists(st.integers(0, 1), min_size=1, max_size=20)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("start"), sequences),
        st.tuples(st.just("finish"), st.integers(0, 30)),
        st.tuples(st.just("evict"), st.integers(1, 6)),
        st.tuples(st.just("reset")),
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(4, 24))
def test_random_use_never_leaks_double_frees_or_evicts_in_use(ops: list, num_blocks: int) -> None:
    """Requests start (taking the cached prefix, computing the rest), end, and the
    cache is squeezed and reset at random. A block's references always equal the
    requests holding it plus one if cached, and a matched block always holds the
    tokens its path says."""
    manager = KVCacheManager(num_blocks, BLOCK_SIZE)
    cache = manager.prefix_cache
    assert cache is not None
    written: dict[int, tuple[int, ...]] = {}  # block -> the tokens up to its end
    live: dict[str, list[int]] = {}
    for index, op in enumerate(ops):
        # Cached blocks some request holds: no eviction or reset may drop these.
        pinned = cache.cached_block_ids() & {b for t in manager.block_tables.values() for b in t}
        if op[0] == "start":
            tokens = op[1]
            rid = f"r{index}"
            hit = manager.share_cached_prefix(rid, tokens[:-1])
            for position, block in enumerate(manager.get_block_table(rid)):
                assert written[block] == tuple(tokens[: (position + 1) * BLOCK_SIZE])
            if not manager.allocate_slots(rid, len(tokens)):
                manager.free(rid)
                continue
            table = manager.get_block_table(rid)
            for position in range(hit // BLOCK_SIZE, len(table)):
                assert manager.pool.ref_count(table[position]) == 1  # our own block
                written[table[position]] = tuple(tokens[: (position + 1) * BLOCK_SIZE])
            manager.cache_full_blocks(rid, len(tokens), lambda s, e, t=tokens: t[s:e])
            live[rid] = tokens
        elif op[0] == "finish" and live:
            rid = sorted(live)[op[1] % len(live)]
            del live[rid]
            manager.free(rid)
        elif op[0] == "evict":
            cache.evict(op[1])
        elif op[0] == "reset":
            assert manager.reset_prefix_cache() == (cache.num_cached_blocks == 0)
        assert pinned <= cache.cached_block_ids()
        holders = Counter(b for t in manager.block_tables.values() for b in t)
        cached = cache.cached_block_ids()
        for block in range(num_blocks):
            assert manager.pool.ref_count(block) == holders[block] + (block in cached)
        assert manager.num_free_blocks == num_blocks - len(set(holders) | cached)
    for rid in list(live):
        manager.free(rid)
    assert manager.num_free_blocks + manager.num_cached_blocks == num_blocks
    assert manager.reset_prefix_cache()
    assert manager.num_free_blocks == num_blocks
