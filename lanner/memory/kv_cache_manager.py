"""Per-request block tables over the block pool: grow, share and release KV blocks."""

from __future__ import annotations

from lanner.memory.block_pool import BlockPool


class KVCacheManager:
    """Owns the block table of every request that holds KV cache.

    Requests are known by id. A request's table covers its computed tokens plus
    the tokens scheduled this step; tables only grow until the request is freed.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of blocks in use, 0..1."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def can_hold(self, num_tokens: int) -> bool:
        """Could a fresh request of this many tokens ever fit in the whole pool?"""
        return self.blocks_needed(num_tokens) <= self.pool.num_blocks

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to hold ``total_tokens`` tokens.
        Returns False, changing nothing, when the pool has too few free blocks."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(total_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free_blocks:
            if not table:
                del self.block_tables[request_id]
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def share_prefix(self, source_id: str, target_id: str, num_tokens: int) -> int:
        """Give ``target_id`` (holding nothing yet) the source's blocks for its first
        ``num_tokens`` tokens, whole blocks only. Returns the tokens shared."""
        if self.block_tables.get(target_id):
            raise RuntimeError(f"request {target_id} already holds blocks")
        num_blocks = min(num_tokens // self.block_size, len(self.get_block_table(source_id)))
        shared = self.block_tables[source_id][:num_blocks] if num_blocks else []
        self.pool.share(shared)
        self.block_tables[target_id] = list(shared)
        return num_blocks * self.block_size

    def free(self, request_id: str) -> None:
        """Release every block the request holds (shared blocks stay with other users)."""
        table = self.block_tables.pop(request_id, None)
        if table:
            # Free the tail first so that blocks come back in least-useful-first order.
            self.pool.free(list(reversed(table)))
