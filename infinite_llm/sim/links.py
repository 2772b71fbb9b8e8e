"""How a simulated home reaches the rest of the cluster: the `PeerLink` of `HomeKV` and the
`CopyLink` of `HomeMigrations`, as priced calls on the other instances' real control state.

- `creditors` asks the gManager (its heartbeat view, so possibly stale) and `borrow` asks a
  creditor's rManager through `control/creditor.py`; each is a round trip the home's loop waits
  for, so each adds 2 x the link latency to the home's current step (`take_delay`).
- `release` and `attach` are one-way messages; they are applied when sent, which keeps the
  per-pair message order the protocol relies on (a release always lands before a later borrow
  for the same request).
- `start_copy` hands a block copy to the simulator, which times it on the source's link.
"""

from __future__ import annotations

import itertools
from typing import Optional, Protocol, Sequence

from infinite_llm.control import creditor
from infinite_llm.control.gmanager import GManager
from infinite_llm.control.messages import AttachBlock, BorrowRequest, ReleaseBlocks
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager
from infinite_llm.sim.cluster import StepCostModel


class World(Protocol):
    """What a home's link needs from the simulator."""

    cost: StepCostModel
    gmanager: GManager
    rmanagers: Sequence[RManager]

    def gmanager_latency(self, instance: int) -> float:
        """One message's latency between `instance` and the gManager."""

    def touched(self, instance: int) -> None:
        """`instance`'s pool changed (it lent or got blocks back): its next heartbeat reports it."""

    def start_copy(self, home: int, tag: int, request_id: str, src: BlockRef, dst: BlockRef, now: float) -> None:
        """Copy one block in the background; report `copy_done` to the home when it lands."""


class HomeLink:
    def __init__(self, home: int, world: World) -> None:
        self.home = home
        self.world = world
        self.now = 0.0  # the simulated time of the home's current step
        self._delay_s = 0.0
        self._tags = itertools.count()
        self.num_borrows = 0
        self.num_refusals = 0

    def counters(self) -> tuple[float, int, int]:
        """(round-trip delay so far this step, borrows, refusals)."""
        return self._delay_s, self.num_borrows, self.num_refusals

    def charge(self, delay_s: float, borrows: int, refusals: int) -> None:
        """Account for calls made on the home's behalf without sending them (see memo_kv.py)."""
        self._delay_s += delay_s
        self.num_borrows += borrows
        self.num_refusals += refusals

    def take_delay(self) -> float:
        """Seconds of round trips the home waited for since the last call."""
        delay, self._delay_s = self._delay_s, 0.0
        return delay

    # ------------------------------------------------------------------ PeerLink
    def creditors(self, num_blocks: int) -> list[tuple[int, int]]:
        self._delay_s += 2 * self.world.gmanager_latency(self.home)
        return self.world.gmanager.candidate_creditors(self.home, num_blocks, self.now)

    def borrow(self, creditor_id: int, request_id: str, num_blocks: int, indices: Optional[list[int]],
               copy_tags: Optional[list[int]] = None, yields: bool = False) -> Optional[list[int]]:
        self._delay_s += 2 * self.world.cost.control_latency(self.home, creditor_id)
        self.num_borrows += 1
        request = BorrowRequest(next(self._tags), self.home, request_id, num_blocks, indices, copy_tags, yields)
        reply = creditor.on_borrow(self.world.rmanagers[creditor_id], request)
        if reply.blocks:
            self.world.touched(creditor_id)
        else:
            self.num_refusals += 1
        return reply.blocks

    def release(self, creditor_id: int, request_id: str, blocks: Optional[list[int]]) -> None:
        creditor.on_release(self.world.rmanagers[creditor_id], ReleaseBlocks(self.home, request_id, blocks))
        self.world.touched(creditor_id)

    def attach(self, holder: int, request_id: str, index: int, block: int) -> None:
        creditor.on_attach(self.world.rmanagers[holder], AttachBlock(self.home, request_id, index, block))

    # ------------------------------------------------------------------ CopyLink
    def start_copy(self, tag: int, request_id: str, src: BlockRef, dst: BlockRef) -> None:
        self.world.start_copy(self.home, tag, request_id, src, dst, self.now)


__all__ = ["HomeLink", "World"]
