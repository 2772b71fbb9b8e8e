"""A home instance's side of migration: orders in, bounded reserve-first block copies out.

The gManager sends `MigrationOrder`s (move k full blocks of request r from instance s to d; s
may be the home or a creditor, d may be the home). The home carries them out across its steps:
- issue (after scheduling a step): within the per-step rate limit, reserve blocks on d first (a
  refused reservation drops the order; the gManager re-plans), then ask s to copy one full,
  immutable block to each reserved block. The copy runs on s's and d's message pumps while
  everyone computes; the table still points at the source, which nobody writes.
- commit (at the home's next step boundary, once d confirmed the copy): the table switches to the
  copy, d learns the block's table position, s releases the source. Per-pair message order makes
  d know the block before the first query that reads it. A copy whose request finished, was
  aborted or preempted meanwhile is dropped: its reservation went with the request's blocks,
  and d never writes a block it does not hold for that request.
Pure Python: the instance engine moves the bytes (`CopyLink`), the simulator prices them.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol

from infinite_llm.control.home_kv import HomeKV
from infinite_llm.control.messages import MigrationOrder
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.request import Request


class CopyLink(Protocol):
    def start_copy(self, tag: int, request_id: str, src: BlockRef, dst: BlockRef) -> None:
        """Copy src's payload into dst; report `copy_done(tag, ok)` to the home later."""


@dataclass(frozen=True)
class _Copy:
    request_id: str
    index: int  # position in the request's block table
    src: BlockRef
    dst: BlockRef


class HomeMigrations:
    def __init__(self, kv: HomeKV, tokens_per_step: int, link: Optional[CopyLink]) -> None:
        if tokens_per_step < 0:
            raise ValueError(f"migration tokens per step must be >= 0, got {tokens_per_step}")
        self.kv = kv
        self.link = link
        self.blocks_per_step = tokens_per_step // kv.block_size
        self.orders: deque[MigrationOrder] = deque()
        self.in_flight: dict[int, _Copy] = {}
        self._done: deque[tuple[int, bool]] = deque()  # appended by the message pump
        self._lock = threading.Lock()
        self._tags = itertools.count()
        self.num_migrated_blocks = 0
        self.num_dropped_copies = 0
        self.num_failed_reservations = 0

    def add_order(self, order: MigrationOrder) -> None:
        """A newer order for the same request replaces the older one (the gManager re-planned).
        An order that moves nothing anywhere is ignored."""
        if order.src == order.dst or order.num_blocks <= 0:
            return
        with self._lock:
            self.orders = deque(o for o in self.orders if o.request_id != order.request_id)
            self.orders.append(order)

    def copy_done(self, tag: int, ok: bool) -> None:
        """Called from the message pump when the target confirms a copy."""
        self._done.append((tag, ok))

    def busy(self) -> bool:
        return bool(self.in_flight or self.orders)

    # ------------------------------------------------------------------ commit
    def commit(self, running: dict[str, Request]) -> int:
        """Switch tables to confirmed copies (call at the step boundary). Returns the count."""
        committed = 0
        while self._done:
            tag, ok = self._done.popleft()
            copy = self.in_flight.pop(tag, None)
            if copy is None:
                continue
            if copy.request_id not in running or copy.dst not in self.kv.reservations(copy.request_id):
                self.num_dropped_copies += 1
                continue
            if not ok:
                self.kv.cancel_reservation(copy.request_id, [copy.dst])
                self.num_dropped_copies += 1
                continue
            if self.kv.block_table(copy.request_id)[copy.index] != copy.src:
                raise RuntimeError(f"block table of {copy.request_id!r} changed under an in-flight copy")
            self.kv.commit_move(copy.request_id, copy.index, copy.dst)
            committed += 1
        self.num_migrated_blocks += committed
        return committed

    # ------------------------------------------------------------------- issue
    def issue(self, running: dict[str, Request]) -> int:
        """Reserve targets and start this step's copies (call after scheduling, so a request
        preempted this step gets none). Returns the number of copies started."""
        self._drop_stale(running)
        budget = self.blocks_per_step
        started = 0
        while budget > started:
            with self._lock:
                if not self.orders:
                    break
                order = self.orders[0]
            request = running.get(order.request_id)
            indices = self._movable(order, request) if request is not None else []
            take = min(len(indices), order.num_blocks, budget - started)
            if take <= 0:
                self._pop(order)
                continue
            tags = [next(self._tags) for _ in range(take)]
            reserved = self.kv.reserve(order.request_id, order.dst, tags)
            if not reserved:
                self.num_failed_reservations += 1
                self._pop(order)
                continue
            table = self.kv.block_table(order.request_id)
            for tag, index, dst in zip(tags, indices[-take:], reserved):  # latest full blocks first
                self.in_flight[tag] = _Copy(order.request_id, index, table[index], dst)
                assert self.link is not None
                self.link.start_copy(tag, order.request_id, table[index], dst)
            started += take
            self._shrink(order, take)
        return started

    def _drop_stale(self, running: dict[str, Request]) -> None:
        """Forget in-flight copies whose reservation is gone (the request finished, was aborted or
        preempted since the copy started). Done before reserving anything: a freed target block
        may be reserved again for the same request, and the stale copy must not commit into it."""
        reserved: dict[str, set[BlockRef]] = {}
        for tag, copy in list(self.in_flight.items()):
            rid = copy.request_id
            if rid not in reserved:
                reserved[rid] = set(self.kv.reservations(rid)) if rid in running else set()
            if copy.dst not in reserved[rid]:
                del self.in_flight[tag]
                self.num_dropped_copies += 1

    def _movable(self, order: MigrationOrder, request: Request) -> list[int]:
        """Table positions of full blocks at the order's source that are not being copied."""
        full = request.num_computed_tokens // self.kv.block_size
        table = self.kv.block_table(order.request_id)
        busy = {c.index for c in self.in_flight.values() if c.request_id == order.request_id}
        return [i for i in range(min(full, len(table))) if table[i].instance == order.src and i not in busy]

    def _pop(self, order: MigrationOrder) -> None:
        with self._lock:
            if self.orders and self.orders[0] is order:
                self.orders.popleft()

    def _shrink(self, order: MigrationOrder, moved: int) -> None:
        with self._lock:
            if not self.orders or self.orders[0] is not order:
                return
            if order.num_blocks <= moved:
                self.orders.popleft()
            else:
                self.orders[0] = MigrationOrder(order.request_id, order.src, order.dst, order.num_blocks - moved)

    def fail_copies_touching(self, instance: int) -> None:
        """A dead instance will never finish the copies from or to it, nor serve orders."""
        with self._lock:
            self.orders = deque(o for o in self.orders if instance not in (o.src, o.dst))
        for tag, copy in list(self.in_flight.items()):
            if instance in (copy.src.instance, copy.dst.instance):
                self.copy_done(tag, False)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self.orders = deque(o for o in self.orders if o.request_id != request_id)
