"""Prefix cache: a radix tree over full KV blocks, so prompts with a common prefix share its KV.

Each edge step is one full block of token ids; each node below the root holds the
id of the pool block whose K/V covers exactly the tokens on the path to it. The tree
keeps its own reference on every cached block, so a block outlives the request that
computed it. A block only the tree holds (pool reference count 1) and with no
children is evictable; leaves are evicted least recently used first, and only when
the pool runs short.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from lanner.memory.block_pool import BlockPool


@dataclass(eq=False, slots=True)
class PrefixNode:
    """One cached block: the tokens it covers and where its K/V lives."""

    block_id: int  # -1 at the root, which covers no tokens
    key: tuple[int, ...]  # the block's token ids
    parent: PrefixNode | None
    children: dict[tuple[int, ...], PrefixNode] = field(default_factory=dict)
    last_access: int = 0
    # False once evicted or reset away: a holder of this node (a request's insert
    # cursor) must then walk from the root again.
    in_tree: bool = True


@dataclass
class PrefixCacheStats:
    """Counters since the engine started (reset_prefix_cache keeps them)."""

    # Every known token of each admitted request (a resumed one counts again).
    queried_tokens: int = 0
    hit_tokens: int = 0  # of those, the tokens whose K/V came from the cache
    evicted_blocks: int = 0  # blocks dropped to make room (not counting resets)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    """The radix tree of cached blocks over one BlockPool."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.root = PrefixNode(-1, (), None)
        self.stats = PrefixCacheStats()
        self._nodes: dict[int, PrefixNode] = {}  # block id -> its node
        # A logical clock, not wall time: LRU order stays deterministic in tests.
        self._clock = itertools.count(1)
        # Eviction candidates as (last_access, block id, push number, node), checked
        # when popped: every node that becomes an unused leaf is pushed (by the pool
        # when its last request lets go, or below when its last child goes), so
        # eviction never scans the whole tree. Stale entries are skipped or re-keyed.
        self._candidates: list[tuple[int, int, int, PrefixNode]] = []
        self._pushes = itertools.count()  # a unique key, so nodes never get compared
        # One cache per pool: it hears of every block whose last request lets go.
        pool.on_single_holder = self._on_single_holder

    @property
    def num_cached_blocks(self) -> int:
        return len(self._nodes)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._nodes

    def cached_block_ids(self) -> set[int]:
        return set(self._nodes)

    def num_evictable_blocks(self) -> int:
        """Cached blocks no request holds (some may wait for a child to be evicted first)."""
        return sum(1 for block in self._nodes if self.pool.ref_count(block) == 1)

    def _blocks(self, token_ids: Sequence[int]) -> list[tuple[int, ...]]:
        """The token tuples of the full blocks in ``token_ids`` (a partial tail is ignored)."""
        size = self.block_size
        return [
            tuple(token_ids[start : start + size])
            for start in range(0, len(token_ids) - size + 1, size)
        ]

    def lookup(self, token_ids: Sequence[int], touch: bool = True) -> list[PrefixNode]:
        """The nodes of the longest cached prefix of ``token_ids`` in whole blocks.
        ``touch`` marks them used now (LRU); a mere peek (e.g. to order a queue) leaves
        them alone."""
        path: list[PrefixNode] = []
        node = self.root
        for key in self._blocks(token_ids):
            child = node.children.get(key)
            if child is None:
                break
            path.append(child)
            node = child
        if touch and path:
            now = next(self._clock)
            for hit in path:
                hit.last_access = now
        return path

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids``, in whole blocks."""
        return [node.block_id for node in self.lookup(token_ids)]

    def insert(
        self,
        token_ids: Sequence[int],
        block_ids: Sequence[int],
        parent: PrefixNode | None = None,
    ) -> PrefixNode:
        """Cache the full blocks ``block_ids`` holding ``token_ids``, below ``parent``
        (the root when None). Where the path is already cached, the cached block stays
        and the caller's duplicate is simply not cached. Returns the node at the end of
        the path, to pass as ``parent`` when the same sequence's next blocks fill."""
        keys = self._blocks(token_ids)
        if len(keys) != len(block_ids) or len(token_ids) != len(keys) * self.block_size:
            raise ValueError(
                f"insert takes whole blocks: {len(token_ids)} token ids do not fill "
                f"{len(block_ids)} blocks of {self.block_size}"
            )
        node = self.root if parent is None else parent
        if not node.in_tree:
            raise RuntimeError("insert below an evicted node; insert from the root instead")
        now = next(self._clock)
        for key, block in zip(keys, block_ids, strict=True):
            child = node.children.get(key)
            if child is None:
                if block in self._nodes:
                    raise RuntimeError(f"block {block} is already cached under other tokens")
                # The tree's own reference keeps the block alive after its request ends.
                self.pool.share([block])
                child = PrefixNode(block, key, node)
                node.children[key] = child
                self._nodes[block] = child
            child.last_access = now
            node = child
        return node

    def _push_candidate(self, node: PrefixNode) -> None:
        entry = (node.last_access, node.block_id, next(self._pushes), node)
        heapq.heappush(self._candidates, entry)
        if len(self._candidates) > 4 * len(self._nodes) + 64:
            # Mostly stale entries (requests came and went, no eviction was needed).
            self._candidates = [
                (n.last_access, n.block_id, next(self._pushes), n)
                for n in self._nodes.values()
                if self._evictable(n)
            ]
            heapq.heapify(self._candidates)

    def _on_single_holder(self, block_id: int) -> None:
        node = self._nodes.get(block_id)
        if node is not None and not node.children:
            self._push_candidate(node)

    def touch(self, node: PrefixNode) -> None:
        """Mark ``node`` and its ancestors used now: called as a request lets its blocks
        go, so blocks of a long request that just ended outlive older leftovers."""
        now = next(self._clock)
        while node.in_tree and node is not self.root:
            node.last_access = now
            assert node.parent is not None
            node = node.parent

    def _evictable(self, node: PrefixNode) -> bool:
        return (
            node.in_tree
            and node is not self.root
            and not node.children
            and self.pool.ref_count(node.block_id) == 1
        )

    def _drop(self, num_blocks: int, count_as_eviction: bool) -> int:
        """Remove up to ``num_blocks`` evictable leaves, least recently used first;
        a parent left childless and unused becomes a candidate in turn."""
        dropped = 0
        while self._candidates and dropped < num_blocks:
            last_access, _, _, node = heapq.heappop(self._candidates)
            if not self._evictable(node):
                continue  # in use again, or gained a child: pushed anew once unused
            if last_access != node.last_access:
                self._push_candidate(node)  # used since it was pushed: re-key it
                continue
            parent = node.parent
            assert parent is not None  # the root is never a candidate
            del parent.children[node.key]
            del self._nodes[node.block_id]
            node.in_tree = False
            self.pool.free([node.block_id])
            dropped += 1
            if self._evictable(parent):
                self._push_candidate(parent)
        if count_as_eviction:
            self.stats.evicted_blocks += dropped
        return dropped

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` cached blocks no request uses; returns how many."""
        return self._drop(num_blocks, count_as_eviction=True)

    def reset(self) -> bool:
        """Drop every cached block no request uses. True when the cache is now empty;
        False when requests still hold cached blocks (those stay cached, with any
        unused block above them on their path)."""
        self._drop(len(self._nodes), count_as_eviction=False)
        return not self._nodes
