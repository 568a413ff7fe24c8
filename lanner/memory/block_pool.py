"""The pool of KV cache blocks: a free list plus a reference count per block."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class BlockPool:
    """Hands out block ids; a block returns to the free list when its last user lets go.

    Sharing (n > 1 samples of one prompt, prefix caching) is a reference count
    above one. Freed blocks go to the back of the free list so recently used
    blocks stay untouched as long as possible.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # Called with a block whose count just fell to one: the prefix cache listens,
        # since a cached block that only it still holds may now be evicted.
        self.on_single_holder: Callable[[int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks, each with one reference; all or nothing."""
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def share(self, block_ids: list[int]) -> None:
        """Add one reference to blocks already in use."""
        for block in block_ids:
            if self._ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} is free and cannot be shared")
            self._ref_counts[block] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks nobody holds become free."""
        for block in block_ids:
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self._ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
            elif count == 2 and self.on_single_holder is not None:
                self.on_single_holder(block)
