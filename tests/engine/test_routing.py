"""Routing policies and the approximate prefix tree: each policy picks what its rule says,
cache_aware keeps tenants on their worker until load is out of balance, and the tree
matches like a brute-force search over what it holds, within its memory bound."""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.engine.routing import (
    BALANCE,
    FALLBACK,
    LOAD,
    MAX_KEY_CHARS,
    PREFIX_HIT,
    ROUND_ROBIN,
    CacheAwareConfig,
    CacheAwarePolicy,
    LeastLoadPolicy,
    PowerOfTwoPolicy,
    PrefixTree,
    RoundRobinPolicy,
    WorkerLoad,
    make_policy,
    text_key,
    token_key,
)


def loads(*outstanding: int, waiting: tuple[int, ...] | None = None) -> list[WorkerLoad]:
    queues = waiting or (0,) * len(outstanding)
    pairs = zip(outstanding, queues, strict=True)
    return [WorkerLoad(f"w{i}", o, q) for i, (o, q) in enumerate(pairs)]


def common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


# -- the prefix tree ----------------------------------------------------------------------


def test_tree_matches_shared_prefixes_and_splits_edges() -> None:
    tree = PrefixTree(max_chars=1000)
    tree.insert("hello world")
    assert tree.match("hello world") == 11
    assert tree.match("hello there") == 6
    assert tree.match("help") == 3
    assert tree.match("xyz") == 0
    tree.insert("hello there")  # splits the edge after "hello "
    assert tree.num_chars == len("hello ") + len("world") + len("there")
    assert tree.match("hello world!") == 11 and tree.match("hello there") == 11
    tree.insert("hell")  # ends inside an edge: one more split, no new characters
    assert tree.num_chars == 16 and tree.match("hell") == 4


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="abc", max_size=12), max_size=25), st.text("abc", max_size=12))
def test_tree_match_equals_brute_force_without_eviction(keys: list[str], probe: str) -> None:
    tree = PrefixTree(max_chars=10_000)
    for key in keys:
        tree.insert(key)
    assert tree.match(probe) == max((common_prefix(k, probe) for k in keys), default=0)
    # Never more characters than the distinct keys spelled out.
    assert tree.num_chars <= sum(len(k) for k in set(keys))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abcd", min_size=1, max_size=30), min_size=1, max_size=60))
def test_tree_stays_within_its_bound_and_keeps_the_newest_key(keys: list[str]) -> None:
    tree = PrefixTree(max_chars=40)
    for key in keys:
        tree.insert(key)
        assert tree.num_chars <= 40
        assert tree.match(key) == len(key)  # the key just used is never the one evicted
    # What it holds is a subset of what was inserted: no match is longer than a real one.
    for probe in {k[:n] for k in keys for n in range(len(k) + 1)}:
        assert tree.match(probe) <= max(common_prefix(k, probe) for k in keys)


def test_tree_evicts_least_recently_used_first() -> None:
    tree = PrefixTree(max_chars=30)
    tree.insert("a" * 10)
    tree.insert("b" * 10)
    tree.insert("c" * 10)
    tree.insert("a" * 10)  # touch a: b is now the oldest
    tree.insert("d" * 10)
    assert tree.match("b" * 10) == 0
    assert [tree.match(ch * 10) for ch in "acd"] == [10, 10, 10]
    assert tree.num_chars == 30


def test_tree_memory_stays_bounded_over_many_distinct_prompts() -> None:
    rng = random.Random(0)
    tree = PrefixTree(max_chars=50_000)
    for _ in range(5_000):
        tree.insert("".join(rng.choice("abcdefgh") for _ in range(rng.randint(20, 80))))
    assert tree.num_chars <= 50_000
    assert len(tree._leaves) <= 2 * tree.num_nodes + 64  # the lazy heap is bounded too


def test_keys_are_bounded_and_text_never_matches_token_ids() -> None:
    assert len(text_key("x" * 10 * MAX_KEY_CHARS)) == MAX_KEY_CHARS
    assert len(token_key(list(range(3 * MAX_KEY_CHARS)))) == MAX_KEY_CHARS
    assert token_key([1, 2, 3]) != text_key("\x01\x02\x03")
    assert token_key([5, 6]).startswith(token_key([5])) and token_key([2**40, -1])


# -- the policies -------------------------------------------------------------------------


def test_round_robin_cycles() -> None:
    policy = RoundRobinPolicy()
    picks = [policy.choose(loads(9, 0, 0), None) for _ in range(6)]
    assert [p.worker for p in picks] == ["w0", "w1", "w2"] * 2
    assert {p.reason for p in picks} == {ROUND_ROBIN}


def test_least_load_uses_queue_depth_to_break_ties_and_rotates_among_equals() -> None:
    policy = LeastLoadPolicy()
    assert policy.choose(loads(3, 1, 2), None).worker == "w1"
    assert policy.choose(loads(2, 2, 2, waiting=(4, 0, 9)), None).worker == "w1"
    quiet = [policy.choose(loads(0, 0, 0), None) for _ in range(30)]
    assert set(Counter(p.worker for p in quiet).values()) == {10}
    assert {p.reason for p in quiet} == {LOAD}


def test_power_of_two_never_picks_the_busier_of_its_two() -> None:
    policy = PowerOfTwoPolicy(seed=0)
    candidates = loads(5, 0, 9)
    picks = Counter(policy.choose(candidates, None).worker for _ in range(300))
    assert "w2" not in picks  # the busiest loses every pair it is drawn into
    assert picks["w1"] > picks["w0"] > 0  # w0 only wins its pairs against w2
    assert policy.choose(loads(7), None).worker == "w0"


def test_cache_aware_keeps_each_tenant_on_one_worker_and_spreads_tenants() -> None:
    policy = CacheAwarePolicy()
    tenants = [f"tenant {t}: " + "system prompt " * 20 for t in range(6)]
    home: dict[int, str] = {}
    reasons = Counter()
    for request in range(60):
        tenant = request % 6
        decision = policy.choose(loads(0, 0, 0), text_key(tenants[tenant] + f"question {request}"))
        reasons[decision.reason] += 1
        assert home.setdefault(tenant, decision.worker) == decision.worker
    assert Counter(home.values()) == {"w0": 2, "w1": 2, "w2": 2}  # new tenants spread
    assert reasons == {FALLBACK: 6, PREFIX_HIT: 54}


def test_cache_aware_threshold_and_load_fallback() -> None:
    policy = CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5))
    policy.choose(loads(0, 0), text_key("a" * 100))  # w0 learns 'aaa...'
    # 40 % of this prompt is on w0: under the threshold, so the least loaded decides.
    decision = policy.choose(loads(1, 0), text_key("a" * 40 + "b" * 60))
    assert (decision.worker, decision.reason) == ("w1", FALLBACK)
    decision = policy.choose(loads(5, 0), text_key("a" * 80 + "c" * 20))
    assert (decision.worker, decision.reason) == ("w0", PREFIX_HIT)
    assert policy.choose(loads(3, 2), None) == policy.choose(loads(3, 2), None)
    assert policy.choose(loads(3, 2), None).reason == FALLBACK


def test_cache_aware_balances_by_load_past_both_thresholds() -> None:
    config = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=2.0)
    policy = CacheAwarePolicy(config)
    key = text_key("shared prefix " * 10)
    assert policy.choose(loads(0, 0), key).worker == "w0"
    # 6 against 3: a gap of 3, within the absolute threshold: the prefix still wins.
    assert policy.choose(loads(6, 3), key).reason == PREFIX_HIT
    # 10 against 3: a gap of 7 and 10 > 2 * 3: out of balance, the least loaded wins.
    decision = policy.choose(loads(10, 3), key)
    assert (decision.worker, decision.reason) == ("w1", BALANCE)
    # 20 against 11: a gap of 9, but 20 < 2 * 11: in relative balance, the prefix wins.
    assert policy.choose(loads(20, 11), key).reason == PREFIX_HIT


def test_cache_aware_forgets_a_removed_worker() -> None:
    policy = CacheAwarePolicy()
    key = text_key("p" * 50)
    assert policy.choose(loads(0, 0), key).worker == "w0"
    assert policy.choose(loads(0, 0), key).reason == PREFIX_HIT
    policy.remove_worker("w0")
    # What w0 held is forgotten: no worker matches, so load (a tie here) decides.
    assert policy.choose(loads(0, 0), key).reason == FALLBACK


def test_make_policy_and_config_checks() -> None:
    names = ("cache_aware", "least_load", "power_of_two", "round_robin")
    assert tuple(make_policy(name).name for name in names) == names
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")
    with pytest.raises(ValueError, match="cache_threshold"):
        CacheAwareConfig(cache_threshold=1.5)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        CacheAwareConfig(balance_rel_threshold=0.5)
    with pytest.raises(ValueError, match="max_tree_size"):
        CacheAwareConfig(max_tree_size=10)
