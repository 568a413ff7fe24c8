"""Per-request block tables over the block pool: grow, share, cache and release KV blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lanner.memory.block_pool import BlockPool
from lanner.memory.prefix_cache import PrefixCache, PrefixCacheStats, PrefixNode


class KVCacheManager:
    """Owns the block table of every request that holds KV cache.

    Requests are known by id. A request's table covers its computed tokens plus
    the tokens scheduled this step; tables only grow until the request is freed.
    With prefix caching on, every full computed block also enters the prefix cache,
    which keeps it after the request ends until the pool needs the room.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.prefix_cache = PrefixCache(self.pool, block_size) if enable_prefix_caching else None
        # Per request: how many leading blocks of its table are on a cached path, and
        # the node ending that path, so each step inserts only the newly filled blocks.
        self._cache_cursors: dict[str, tuple[int, PrefixNode | None]] = {}

    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.prefix_cache.num_cached_blocks if self.prefix_cache else 0

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.prefix_cache.stats if self.prefix_cache else None

    @property
    def usage(self) -> float:
        """Share of blocks requests hold, 0..1 (blocks only the cache keeps count as free)."""
        evictable = self.prefix_cache.num_evictable_blocks() if self.prefix_cache else 0
        return (self.pool.num_used_blocks - evictable) / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to hold ``total_tokens`` tokens, evicting cached
        blocks nobody uses when the free list is short. Returns False, adding no
        block, when even that leaves too few."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(total_tokens) - len(table)
        if missing <= 0:
            return True
        short = missing - self.pool.num_free_blocks
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        if missing > self.pool.num_free_blocks:
            if not table:
                del self.block_tables[request_id]
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def trim_slots(self, request_id: str, total_tokens: int) -> None:
        """Shrink the request's table to the blocks ``total_tokens`` tokens need: after a
        verification, blocks that held only rejected draft tokens go back to the pool
        (they are past every computed token, so no other holder shares them)."""
        table = self.block_tables.get(request_id)
        if not table:
            return
        keep = self.blocks_needed(total_tokens)
        if len(table) > keep:
            excess = table[keep:]
            del table[keep:]
            self.pool.free(list(reversed(excess)))

    def cached_prefix_length(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids`` the prefix cache could supply now (whole blocks);
        a peek that changes nothing."""
        if self.prefix_cache is None:
            return 0
        return len(self.prefix_cache.lookup(token_ids, touch=False)) * self.block_size

    def share_cached_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Start ``request_id`` (holding nothing yet) on the cached blocks of the longest
        cached prefix of ``token_ids``. Returns the tokens it need not compute. The
        caller bounds ``token_ids`` (e.g. all but the last known token, which must run
        to give logits)."""
        if self.block_tables.get(request_id):
            raise RuntimeError(f"request {request_id} already holds blocks")
        if self.prefix_cache is None:
            return 0
        path = self.prefix_cache.lookup(token_ids)
        if not path:
            return 0
        blocks = [node.block_id for node in path]
        self.pool.share(blocks)
        self.block_tables[request_id] = blocks
        self._cache_cursors[request_id] = (len(blocks), path[-1])
        return len(blocks) * self.block_size

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (admissions that fail are not counted,
        so a request retried across steps counts once)."""
        if self.prefix_cache is not None:
            self.prefix_cache.stats.queried_tokens += num_queried_tokens
            self.prefix_cache.stats.hit_tokens += num_hit_tokens

    def cache_full_blocks(
        self,
        request_id: str,
        num_computed_tokens: int,
        token_ids: Callable[[int, int], list[int]],
    ) -> None:
        """Insert the request's blocks fully covered by ``num_computed_tokens`` into the
        prefix cache. ``token_ids(start, end)`` gives the request's tokens [start, end);
        only blocks not inserted before are asked for."""
        table = self.block_tables.get(request_id)
        if self.prefix_cache is None or not table:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        done, node = self._cache_cursors.get(request_id, (0, None))
        if num_full <= done:
            return
        if node is not None and not node.in_tree:
            # The cached twin this path ran through was evicted (the request's own
            # copy was never cached), so walk the whole path again from the root.
            done, node = 0, None
        size = self.block_size
        node = self.prefix_cache.insert(
            token_ids(done * size, num_full * size), table[done:num_full], parent=node
        )
        self._cache_cursors[request_id] = (num_full, node)

    def share_prefix(self, source_id: str, target_id: str, num_tokens: int) -> int:
        """Give ``target_id`` (holding nothing yet) the source's blocks for its first
        ``num_tokens`` tokens, whole blocks only. Returns the tokens shared. (With
        prefix caching on, siblings find these blocks in the cache instead.)"""
        if self.block_tables.get(target_id):
            raise RuntimeError(f"request {target_id} already holds blocks")
        num_blocks = min(num_tokens // self.block_size, len(self.get_block_table(source_id)))
        shared = self.block_tables[source_id][:num_blocks] if num_blocks else []
        self.pool.share(shared)
        self.block_tables[target_id] = list(shared)
        return num_blocks * self.block_size

    def free(self, request_id: str) -> None:
        """Release every block the request holds (shared and cached blocks stay with
        their other holders). Cache its full blocks first with ``cache_full_blocks``."""
        _, node = self._cache_cursors.pop(request_id, (0, None))
        if node is not None and self.prefix_cache is not None:
            self.prefix_cache.touch(node)
        table = self.block_tables.pop(request_id, None)
        if table:
            # Free the tail first so that blocks come back in least-useful-first order.
            self.pool.free(list(reversed(table)))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request uses; True when the cache ends empty."""
        if self.prefix_cache is None:
            return True
        return self.prefix_cache.reset()
