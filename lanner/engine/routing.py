"""Routing policies: which of several replicas serves a request (round robin, least load,
power of two choices, cache aware). `lanner router` (over HTTP workers) and the
data-parallel engine (over in-process engine cores) share them."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# Why a request went where it went (the router's and the server's metrics label).
PREFIX_HIT = "prefix_hit"  # cache_aware: a worker holds enough of the prompt
FALLBACK = "fallback"  # cache_aware: no worker holds enough; the least loaded one
BALANCE = "balance"  # cache_aware: load is out of balance, so load alone decides
LOAD = "load"  # least_load / power_of_two
ROUND_ROBIN = "round_robin"
REASONS = (PREFIX_HIT, FALLBACK, BALANCE, LOAD, ROUND_ROBIN)

# A route key holds at most this many characters (or tokens) of a prompt: affinity is
# decided by the prefix, and matching or storing a huge prompt must stay cheap.
MAX_KEY_CHARS = 32_768
# Keys of text and of token ids live apart: a text prompt never "matches" token ids.
_TEXT_MARK = "\x02"
_TOKEN_MARK = "\x03"
_UNICODE_SIZE = 0x110000


def text_key(text: str) -> str:
    """The route key of a prompt given as text (the server's completions text, or the
    router's rendering of chat messages)."""
    return _TEXT_MARK + text[: MAX_KEY_CHARS - 1]


def token_key(token_ids: Sequence[int]) -> str:
    """The route key of a prompt given as token ids: one character per token, so the
    same tree and the same slice comparisons serve both."""
    return _TOKEN_MARK + "".join(chr(t % _UNICODE_SIZE) for t in token_ids[: MAX_KEY_CHARS - 1])


@dataclass
class WorkerLoad:
    """What a policy knows of one candidate worker."""

    worker: str  # its name: a URL for the router, the engine's rank in-process
    outstanding: int  # requests sent to it and not finished, as the sender counts them
    waiting: int = 0  # its own queue depth (num_requests_waiting) as last reported


@dataclass(frozen=True)
class RouteDecision:
    worker: str
    reason: str


class RoutingPolicy:
    """Picks one worker among the healthy candidates (never an empty list). Policies
    that learn nothing from past requests keep the no-op forgetting methods."""

    name: ClassVar[str]

    def choose(self, candidates: Sequence[WorkerLoad], key: str | None) -> RouteDecision:
        """The worker for a request whose prompt has route `key` (None: unknown)."""
        raise NotImplementedError

    def remove_worker(self, worker: str) -> None:
        """Forget what was learned about `worker` (it left, or its cache was emptied)."""

    def reset(self) -> None:
        """Forget what was learned about every worker."""


def _least_loaded(candidates: Sequence[WorkerLoad], rotation: int) -> WorkerLoad:
    """Fewest outstanding requests, then the shortest queue; among equals, the one after
    the last pick (so a quiet fleet still spreads its requests)."""
    count = len(candidates)
    order = [candidates[(rotation + i) % count] for i in range(count)]
    return min(order, key=lambda c: (c.outstanding, c.waiting))


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[WorkerLoad], key: str | None) -> RouteDecision:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return RouteDecision(chosen.worker, ROUND_ROBIN)


class LeastLoadPolicy(RoutingPolicy):
    name = "least_load"

    def __init__(self) -> None:
        self._rotation = itertools.count()

    def choose(self, candidates: Sequence[WorkerLoad], key: str | None) -> RouteDecision:
        return RouteDecision(_least_loaded(candidates, next(self._rotation)).worker, LOAD)


class PowerOfTwoPolicy(RoutingPolicy):
    """Two workers drawn at random; the less loaded of them."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[WorkerLoad], key: str | None) -> RouteDecision:
        if len(candidates) == 1:
            return RouteDecision(candidates[0].worker, LOAD)
        first, second = self._rng.sample(list(candidates), 2)
        chosen = min((first, second), key=lambda c: (c.outstanding, c.waiting))
        return RouteDecision(chosen.worker, LOAD)


@dataclass(frozen=True)
class CacheAwareConfig:
    """sgl-router's knobs, with its names."""

    # Route by prefix when the best worker holds at least this share of the prompt.
    cache_threshold: float = 0.5
    # Load is out of balance when max - min outstanding exceeds balance_abs_threshold
    # and max exceeds min * balance_rel_threshold; then load alone decides.
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    # Characters (or tokens) each worker's tree may hold before LRU eviction.
    max_tree_size: int = 1 << 22

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(
                f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}"
            )
        if self.balance_rel_threshold < 1.0:
            raise ValueError(
                f"balance_rel_threshold must be >= 1, got {self.balance_rel_threshold}"
            )
        if self.max_tree_size < MAX_KEY_CHARS:
            raise ValueError(f"max_tree_size must be >= {MAX_KEY_CHARS}, got {self.max_tree_size}")


class CacheAwarePolicy(RoutingPolicy):
    """Per worker, an approximate prefix tree of the prompts sent there (the worker's
    prefix cache is likely to still hold them): the longest match wins when it covers
    enough of the prompt, else the least loaded worker (among equals, the one whose
    tree is smallest, so new prefixes spread); when load is out of balance, load
    alone decides."""

    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        self.config = config or CacheAwareConfig()
        self.trees: dict[str, PrefixTree] = {}

    def _tree(self, worker: str) -> PrefixTree:
        tree = self.trees.get(worker)
        if tree is None:
            tree = self.trees[worker] = PrefixTree(self.config.max_tree_size)
        return tree

    def is_imbalanced(self, candidates: Sequence[WorkerLoad]) -> bool:
        loads = [c.outstanding for c in candidates]
        high, low = max(loads), min(loads)
        return (
            high - low > self.config.balance_abs_threshold
            and high > low * self.config.balance_rel_threshold
        )

    def choose(self, candidates: Sequence[WorkerLoad], key: str | None) -> RouteDecision:
        def by_load(c: WorkerLoad) -> tuple[int, int, int]:
            return (c.outstanding, c.waiting, self._tree(c.worker).num_chars)

        if self.is_imbalanced(candidates):
            decision = RouteDecision(min(candidates, key=by_load).worker, BALANCE)
        elif key:
            matches = [(self._tree(c.worker).match(key), c) for c in candidates]
            best_len, best = max(matches, key=lambda m: (m[0], -m[1].outstanding))
            if best_len > 1 and best_len >= self.config.cache_threshold * len(key):
                decision = RouteDecision(best.worker, PREFIX_HIT)
            else:
                decision = RouteDecision(min(candidates, key=by_load).worker, FALLBACK)
        else:
            decision = RouteDecision(min(candidates, key=by_load).worker, FALLBACK)
        if key:
            self._tree(decision.worker).insert(key)
        return decision

    def remove_worker(self, worker: str) -> None:
        self.trees.pop(worker, None)

    def reset(self) -> None:
        self.trees.clear()


POLICIES: dict[str, type[RoutingPolicy]] = {
    policy.name: policy
    for policy in (CacheAwarePolicy, LeastLoadPolicy, PowerOfTwoPolicy, RoundRobinPolicy)
}


def make_policy(name: str, cache_aware: CacheAwareConfig | None = None) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == CacheAwarePolicy.name:
        return CacheAwarePolicy(cache_aware)
    return POLICIES[name]()


# -- the approximate prefix tree ----------------------------------------------------------


class _Node:
    __slots__ = ("label", "children", "parent", "last_access")

    def __init__(self, label: str, parent: _Node | None, last_access: int) -> None:
        self.label = label
        self.children: dict[str, _Node] = {}
        self.parent = parent  # None for the root and for evicted nodes
        self.last_access = last_access


def _common_prefix_len(label: str, key: str, start: int) -> int:
    """How many leading characters of `label` equal key[start:] (binary search over
    C-level slice comparisons, not a Python loop over characters)."""
    low, high = 0, min(len(label), len(key) - start)
    while low < high:
        middle = (low + high + 1) // 2
        if key.startswith(label[:middle], start):
            low = middle
        else:
            high = middle - 1
    return low


class PrefixTree:
    """A radix tree over the characters of route keys: at most `max_chars` characters in
    all; when an insert goes past that, least recently used leaves go first."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.root = _Node("", None, 0)
        self.num_chars = 0
        self.num_nodes = 0
        self._clock = 0
        # Leaves by last access, stale entries skipped when popped (lazy deletion).
        self._leaves: list[tuple[int, int, _Node]] = []
        self._sequence = itertools.count()

    def match(self, key: str) -> int:
        """The length of the longest prefix of `key` the tree holds."""
        node, position = self.root, 0
        while position < len(key):
            child = node.children.get(key[position])
            if child is None:
                break
            if key.startswith(child.label, position):
                position += len(child.label)
                node = child
                continue
            position += _common_prefix_len(child.label, key, position)
            break
        return position

    def insert(self, key: str) -> None:
        """Record `key` as just used (its path becomes the most recent), then evict."""
        self._clock += 1
        now = self._clock
        node, position = self.root, 0
        while position < len(key):
            first = key[position]
            child = node.children.get(first)
            if child is None:
                child = _Node(key[position:], node, now)
                node.children[first] = child
                self.num_chars += len(child.label)
                self.num_nodes += 1
                node, position = child, len(key)
                break
            if key.startswith(child.label, position):
                position += len(child.label)
            else:  # the key leaves this edge part way: split it there
                common = _common_prefix_len(child.label, key, position)
                middle = _Node(child.label[:common], node, child.last_access)
                child.label = child.label[common:]
                child.parent = middle
                middle.children[child.label[0]] = child
                node.children[first] = middle
                self.num_nodes += 1
                child, position = middle, position + common
            child.last_access = now
            node = child
        if node is not self.root and not node.children:
            self._push_leaf(node)
        self._evict()

    def _push_leaf(self, node: _Node) -> None:
        heapq.heappush(self._leaves, (node.last_access, next(self._sequence), node))
        if len(self._leaves) > 2 * self.num_nodes + 64:
            self._rebuild_leaves()

    def _rebuild_leaves(self) -> None:
        leaves: list[tuple[int, int, _Node]] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append((node.last_access, next(self._sequence), node))
        heapq.heapify(leaves)
        self._leaves = leaves

    def _evict(self) -> None:
        while self.num_chars > self.max_chars and self._leaves:
            access, _, node = heapq.heappop(self._leaves)
            parent = node.parent
            if parent is None or node.children or node.last_access != access:
                continue  # evicted already, no longer a leaf, or touched since
            del parent.children[node.label[0]]
            node.parent = None
            self.num_chars -= len(node.label)
            self.num_nodes -= 1
            if parent is not self.root and not parent.children:
                self._push_leaf(parent)

    def stats(self) -> dict[str, Any]:
        return {"chars": self.num_chars, "nodes": self.num_nodes}
