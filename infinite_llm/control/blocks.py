"""BlockPool: the free list of one instance's KV blocks (pure Python, no torch).

A block id is an index into the instance's KV tensors. The pool only tracks which ids are
in use; who uses them (which request, lent to whom) is the rManager's business.
"""

from __future__ import annotations

import heapq
from typing import Iterable


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than an allocation asked for."""


class BlockPool:
    """A fixed set of block ids ``0 .. num_blocks-1``.

    Allocation hands out the lowest free ids first (a min-heap), so the same sequence of calls
    always yields the same ids: the control plane and the simulator are deterministic.
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool):
            raise TypeError(f"num_blocks must be an int, got {type(num_blocks).__name__}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_heap: list[int] = list(range(num_blocks))  # already a valid heap
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    @property
    def num_used(self) -> int:
        return len(self._allocated)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (lowest ids first); all of them or none."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"number of blocks must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free_heap):
            raise NoFreeBlocksError(
                f"asked for {n} blocks but only {len(self._free_heap)} of {self.num_blocks} are free"
            )
        blocks = [heapq.heappop(self._free_heap) for _ in range(n)]
        self._allocated.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks to the pool. Validates the whole batch first: on a double free, an
        unknown id or a repeated id, raises ValueError and frees nothing."""
        to_free = list(blocks)
        seen: set[int] = set()
        for block in to_free:
            if not self._is_valid_id(block):
                raise ValueError(f"unknown block id {block!r} (pool has {self.num_blocks} blocks)")
            if block in seen:
                raise ValueError(f"block {block} appears twice in one free() call")
            if block not in self._allocated:
                raise ValueError(f"double free: block {block} is not allocated")
            seen.add(block)
        for block in to_free:
            self._allocated.remove(block)
            heapq.heappush(self._free_heap, block)

    def is_allocated(self, block: int) -> bool:
        return block in self._allocated

    def allocated_blocks(self) -> set[int]:
        """A copy of the set of allocated ids (for invariant checks)."""
        return set(self._allocated)

    def _is_valid_id(self, block: object) -> bool:
        return (
            isinstance(block, int)
            and not isinstance(block, bool)
            and 0 <= block < self.num_blocks
        )

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, free={self.num_free})"
