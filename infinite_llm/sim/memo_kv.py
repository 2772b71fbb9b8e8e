"""`HomeKV` with its failed allocations remembered, so that a blocked request costs the
simulator nothing per retry (pure Python).

The scheduler retries the head of its waiting queue every step, and a failing allocation is
expensive to simulate: `HomeKV` takes what it can (locally, then from every creditor the gManager
names, or for `striped` from every instance) and then gives it all back. A failed attempt leaves
every pool as it found it, and its outcome depends only on the request's table, the pools'
free and lent counts and the gManager's view. So the attempt is not repeated when
- all of those are unchanged since the last failure of the same allocation: it fails the same
  way, and its round trips and borrow counts are charged again as if it had run; or
- it needs more blocks than the home has free plus what every other instance could lend: it
  cannot succeed. Its round trips are then charged as in the request's last real failure (the
  exact number of calls it would make depends on the creditors' order; a few microseconds each).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional

from infinite_llm.control.home_kv import HomeKV
from infinite_llm.control.rmanager import RManager
from infinite_llm.sim.links import HomeLink


class MemoHomeKV(HomeKV):
    def __init__(self, rmanager: RManager, block_size: int, placement: str, num_instances: int,
                 link: HomeLink, state: Callable[[], tuple], room: Callable[[int], int],
                 lock: Optional[ContextManager] = None, headroom_fraction: float = 0.0) -> None:
        super().__init__(rmanager, block_size, placement, num_instances, link, lock, headroom_fraction)
        self.link = link
        self._state = state  # the cluster state an allocation's outcome depends on
        self._room = room  # home -> its free blocks plus what all others could lend it
        self._failed: Optional[tuple] = None
        self._failed_cost: dict[str, tuple[float, int, int]] = {}  # request -> its last real failure's calls
        self.num_memo_hits = 0

    def allocate(self, request_id: str, total_tokens: int, yielding: bool = True) -> bool:
        need = self.num_blocks_needed(request_id, total_tokens)
        if need == 0:
            return True
        last = self._failed_cost.get(request_id)
        if last is not None and (need > self._room(self.home) or self._key(request_id, total_tokens, yielding) == self._failed):
            self.link.charge(*last)
            self.num_memo_hits += 1
            return False
        before = self.link.counters()
        if super().allocate(request_id, total_tokens, yielding):
            self._failed_cost.pop(request_id, None)
            return True
        after = self.link.counters()
        # A failed attempt gave everything back: the state after it is the state it met.
        self._failed = self._key(request_id, total_tokens, yielding)
        self._failed_cost[request_id] = (after[0] - before[0], after[1] - before[1], after[2] - before[2])
        return False

    def _key(self, request_id: str, total_tokens: int, yielding: bool) -> tuple:
        return (request_id, total_tokens, yielding, len(self.block_table(request_id)), self._state())

    def free(self, request_id: str) -> None:
        self._failed_cost.pop(request_id, None)
        super().free(request_id)


__all__ = ["MemoHomeKV"]
