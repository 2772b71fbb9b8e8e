"""One instance's block tables for the requests homed on it (pure Python, no torch).

The home's own pool comes first: a request's new KV goes to the home while it has room, and
only when it is full are blocks borrowed from the creditors the gManager names (`infinite`).
One exception: a request larger than one instance (it can only ever run on lent memory) has what
it borrows spread level over the home and the creditors (`water_fill`), because attention over
it waits for its biggest holder, and a home filled by it would have no room left for the short
requests homed there. Such a request is also admitted only when every holder keeps a share of its
pool free (`headroom_fraction`): admitted into the last free blocks, it would soon be asked to
give them back to a short request (`ReclaimBlocks`) and lose the prompt it had computed.
`static` never borrows; `striped` puts block j of a request on the j-th live member after the
home (ids in order, wrapping).
Everything that crosses instances goes through a `PeerLink` (borrow -> grant/refuse, release,
attach), which the instance engine implements with messages and the simulator with priced
calls. Allocation is all-or-nothing: a refusal part-way gives back what was taken.

The instance's rManager is shared with its message pump (which lends to and releases for
peers), so every rManager call here holds `lock`.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import ContextManager, Optional, Protocol

from infinite_llm.control.messages import RequestPlacement
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager

PLACEMENT_POLICIES = ("static", "striped", "infinite")


class PeerLink(Protocol):
    """How a home reaches other instances' rManagers and the gManager."""

    def creditors(self, num_blocks: int) -> list[tuple[int, int]]:
        """(instance, lendable blocks as last reported) that may lend, best first."""

    def borrow(self, creditor: int, request_id: str, num_blocks: int, indices: Optional[list[int]],
               copy_tags: Optional[list[int]] = None, yields: bool = False) -> Optional[list[int]]:
        """Blocks granted by `creditor` (all `num_blocks`), or None if it refused. Without
        `indices` it is a migration reservation for the copies `copy_tags`. `yields`: the
        request is larger than one instance (see `BorrowRequest.yields`)."""

    def release(self, creditor: int, request_id: str, blocks: Optional[list[int]]) -> None:
        """Give blocks back (None: all the request's blocks there); does not wait."""

    def attach(self, holder: int, request_id: str, index: int, block: int) -> None:
        """Tell `holder` that its reserved `block` is now table position `index`."""


def lend_cap_for(placement: str, num_blocks: int, lend_fraction: float) -> int:
    """The rManager's lend cap under a policy (striped models one pooled instance: no cap)."""
    if placement == "striped":
        return num_blocks
    if placement == "static":
        return 0
    return math.floor(lend_fraction * num_blocks)


def max_tokens_per_request(placement: str, num_instances: int, num_blocks_per_instance: int, lend_cap: int,
                           block_size: int) -> int:
    """The longest context one request could hold under a policy, with the cluster empty."""
    if placement == "static" or num_instances == 1:
        blocks = num_blocks_per_instance
    elif placement == "striped":
        blocks = num_blocks_per_instance * num_instances
    else:
        blocks = num_blocks_per_instance + (num_instances - 1) * min(lend_cap, num_blocks_per_instance)
    return blocks * block_size


def water_fill(need: int, room: list[int]) -> Optional[list[int]]:
    """Shares of `need` blocks over holders with `room` each, as level as their room allows (the
    largest share as small as it can be; the first holder keeps the level longest). None if the
    room is short."""
    if need > sum(room):
        return None
    level_lo, level_hi = 0, max(room, default=0)
    while level_lo < level_hi:  # the lowest level L with sum(min(r, L)) >= need
        mid = (level_lo + level_hi) // 2
        if sum(min(r, mid) for r in room) >= need:
            level_hi = mid
        else:
            level_lo = mid + 1
    shares = [min(r, level_lo) for r in room]
    excess = sum(shares) - need
    for i in range(len(shares) - 1, -1, -1):
        if excess and shares[i] == level_lo:
            shares[i] -= 1
            excess -= 1
    return shares


class HomeKV:
    def __init__(self, rmanager: RManager, block_size: int, placement: str, num_instances: int,
                 peers: Optional[PeerLink], lock: Optional[ContextManager] = None,
                 headroom_fraction: float = 0.0) -> None:
        if placement not in PLACEMENT_POLICIES:
            raise ValueError(f"unknown placement policy {placement!r}; expected one of {PLACEMENT_POLICIES}")
        if not 0.0 <= headroom_fraction < 1.0:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction}")
        if num_instances > 1 and placement != "static" and peers is None:
            raise ValueError("a home that may borrow needs a PeerLink")
        self.rm = rmanager
        self.home = rmanager.instance_id
        self.block_size = block_size
        self.placement = placement
        self.members: list[int] = list(range(num_instances))  # live instances, ids in order
        self.peers = peers
        self.lock = lock if lock is not None else contextlib.nullcontext()
        # Blocks every holder keeps free when a request larger than one instance is admitted.
        self.headroom_blocks = math.floor(headroom_fraction * rmanager.pool.num_blocks)
        self._tables: dict[str, list[BlockRef]] = {}
        self._reserved: dict[str, list[BlockRef]] = {}
        self._counts: dict[str, Counter[int]] = {}  # request -> instance -> blocks in its table

    @property
    def num_instances(self) -> int:
        return len(self.members)

    def set_members(self, live: list[int]) -> None:
        """The live instances changed (one died, was removed, or joined)."""
        if self.home not in live:
            raise ValueError(f"the home instance {self.home} must be a live member")
        self.members = sorted(live)

    # ------------------------------------------------------------------ queries
    def block_table(self, request_id: str) -> list[BlockRef]:
        """The request's blocks in sequence order (the live list: do not mutate)."""
        return self._tables.get(request_id, [])

    def reservations(self, request_id: str) -> list[BlockRef]:
        return list(self._reserved.get(request_id, []))

    def requests(self) -> list[str]:
        return list(self._tables.keys() | self._reserved.keys())

    def holders(self, request_id: str) -> dict[int, int]:
        """instance -> number of the request's table blocks held there."""
        return dict(self._counts.get(request_id, {}))

    def is_split(self, request_id: str) -> bool:
        counts = self._counts.get(request_id)
        return bool(counts) and any(i != self.home for i in counts)

    def pause_lending(self, paused: bool) -> None:
        """A request homed here waits for memory: lend none of it to other homes meanwhile."""
        with self.lock:
            self.rm.lending_paused = paused

    def spans_instances(self, total_tokens: int) -> bool:
        """Whether a request of `total_tokens` is larger than this whole instance (it can only
        ever run on lent memory)."""
        return -(-total_tokens // self.block_size) > self.rm.pool.num_blocks

    def fits_at_home(self, request_id: str, total_tokens: int) -> bool:
        """Whether growing the request to `total_tokens` needs no block from another instance."""
        with self.lock:
            return self.num_blocks_needed(request_id, total_tokens) <= self.rm.num_free

    def num_blocks_needed(self, request_id: str, total_tokens: int) -> int:
        have = len(self._tables.get(request_id, []))
        return max(0, -(-total_tokens // self.block_size) - have)

    def max_tokens_per_request(self, num_blocks_per_instance: int, lend_cap: int) -> int:
        """The longest context one request homed here could hold with the live members empty."""
        return max_tokens_per_request(self.placement, self.num_instances, num_blocks_per_instance, lend_cap,
                                      self.block_size)

    def placement_of(self, request_id: str, num_computed_tokens: int) -> RequestPlacement:
        """What the gManager needs to plan moves of this request."""
        table = self._tables.get(request_id, [])
        counts = self._counts.get(request_id, Counter())
        movable = Counter(counts)
        for ref in table[num_computed_tokens // self.block_size:]:
            movable[ref.instance] -= 1  # not full yet: still written
        bs = self.block_size
        return RequestPlacement(
            request_id=request_id, home=self.home,
            tokens_by_instance={i: n * bs for i, n in sorted(counts.items()) if n},
            movable_blocks={i: n for i, n in sorted(movable.items()) if n > 0},
        )

    # --------------------------------------------------------------- allocation
    def allocate(self, request_id: str, total_tokens: int, yielding: bool = True) -> bool:
        """Grow the request's table to cover `total_tokens`: all the blocks or none. A request
        larger than one instance that no longer yields (it starved) is admitted without the
        holders' headroom, and its borrowed blocks cannot be reclaimed."""
        need = self.num_blocks_needed(request_id, total_tokens)
        if need == 0:
            return True
        start = len(self._tables.get(request_id, []))
        if self.placement == "striped" and self.num_instances > 1:
            refs = self._allocate_striped(request_id, start, need)
        else:
            refs = self._allocate_home_first(request_id, start, need, yielding)
        if refs is None:
            return False
        self._tables.setdefault(request_id, []).extend(refs)
        self._counts.setdefault(request_id, Counter()).update(r.instance for r in refs)
        return True

    def _allocate_home_first(self, request_id: str, start: int, need: int,
                             yielding: bool = True) -> Optional[list[BlockRef]]:
        with self.lock:
            free = self.rm.num_free
            if need <= free:
                return self.rm.allocate_local(request_id, need)
        if self.placement == "static" or self.num_instances == 1:
            return None
        assert self.peers is not None
        creditors = [(c, n) for c, n in self.peers.creditors(need - free) if c != self.home and n > 0]
        spans = self.spans_instances((start + need) * self.block_size)
        yields = spans and yielding
        if self.placement == "infinite" and spans:
            return self._allocate_level(request_id, start, need, free, creditors, yields)
        with self.lock:
            refs = self.rm.allocate_local(request_id, min(free, self.rm.num_free)) or []
        for creditor, lendable in creditors:
            take = min(need - len(refs), lendable)
            if take > 0:
                self._borrow_into(refs, creditor, request_id, take, start, yields)
        if len(refs) < need:
            self._give_back(request_id, refs)
            return None
        return refs

    def _allocate_level(self, request_id: str, start: int, need: int, free: int,
                        creditors: list[tuple[int, int]], yields: bool = True) -> Optional[list[BlockRef]]:
        """Water-fill the blocks over the home's free room and the creditors' lendable room, so
        that no holder (the home included) holds much more of the request than the others. A
        creditor may refuse (the gManager's view lags): its share falls to the home's leftover
        room, then to what the others said they could lend beyond their share; if still short,
        all goes back."""
        room = [free] + [n for _, n in creditors]
        if start == 0 and yields:  # admission (or recompute): leave every holder its headroom
            room = self._room_past_headroom(need, room)
        shares = water_fill(need, room) if room is not None else None
        if shares is None:
            return None
        with self.lock:
            refs = self.rm.allocate_local(request_id, shares[0]) or []
        refused = set()
        for (creditor, _), share in zip(creditors, shares[1:]):
            if share and not self._borrow_into(refs, creditor, request_id, share, start, yields):
                refused.add(creditor)
        with self.lock:
            short = need - len(refs)
            refs.extend(self.rm.allocate_local(request_id, min(short, self.rm.num_free)) or [])
        for (creditor, lendable), share in zip(creditors, shares[1:]):
            spare = min(need - len(refs), lendable - share)
            if spare > 0 and creditor not in refused:
                self._borrow_into(refs, creditor, request_id, spare, start, yields)
        if len(refs) < need:
            self._give_back(request_id, refs)
            return None
        return refs

    def _room_past_headroom(self, need: int, room: list[int]) -> Optional[list[int]]:
        """The room each holder gives a request larger than one instance at its admission:
        what it has beyond its headroom. None (wait) if that is short now but would not be on an
        empty cluster; a request too large ever to leave every holder its headroom gets the
        whole room (else it could never start)."""
        def past_headroom(rooms: list[int]) -> list[int]:
            return [max(0, r - self.headroom_blocks) for r in rooms]

        spare = past_headroom(room)
        if need <= sum(spare):
            return spare
        # Empty, the home has its pool and each peer its lend cap (every instance has our config).
        pool = self.rm.pool.num_blocks
        empty = [pool] + [min(self.rm.lend_cap, pool)] * (self.num_instances - 1)
        if need <= sum(past_headroom(empty)):
            return None
        return room

    def _borrow_into(self, refs: list[BlockRef], creditor: int, request_id: str, n: int, start: int,
                     yields: bool) -> bool:
        """Borrow `n` blocks for the next table positions, appending them to `refs`."""
        indices = list(range(start + len(refs), start + len(refs) + n))
        got = self._borrow(creditor, request_id, n, indices, yields=yields)
        refs.extend(got or [])
        return bool(got)

    def _allocate_striped(self, request_id: str, start: int, need: int) -> Optional[list[BlockRef]]:
        """Block j on the j-th member after the home; one that refuses is skipped for the rest."""
        members = self.members
        n, first = len(members), members.index(self.home)
        wanted: dict[int, list[int]] = {}
        for index in range(start, start + need):
            wanted.setdefault(members[(first + index) % n], []).append(index)
        placed: dict[int, BlockRef] = {}
        refused: set[int] = set()
        while wanted:
            instance, indices = next(iter(wanted.items()))
            del wanted[instance]
            got = self._take(instance, request_id, indices)
            if got is not None:
                placed.update(zip(indices, got))
                continue
            refused.add(instance)
            others = [i for i in members if i not in refused]
            if not others:
                self._give_back(request_id, list(placed.values()))
                return None
            for k, index in enumerate(indices):  # spread the refused positions over the rest
                wanted.setdefault(others[k % len(others)], []).append(index)
        return [placed[i] for i in range(start, start + need)]

    def _take(self, instance: int, request_id: str, indices: list[int]) -> Optional[list[BlockRef]]:
        if instance == self.home:
            with self.lock:
                return self.rm.allocate_local(request_id, len(indices))
        return self._borrow(instance, request_id, len(indices), indices)

    def _borrow(self, creditor: int, request_id: str, n: int, indices: Optional[list[int]],
                copy_tags: Optional[list[int]] = None, yields: bool = False) -> Optional[list[BlockRef]]:
        assert self.peers is not None
        blocks = self.peers.borrow(creditor, request_id, n, indices, copy_tags, yields)
        if not blocks:
            return None
        refs = [BlockRef(creditor, b) for b in blocks]
        with self.lock:
            self.rm.record_borrowed(request_id, creditor, refs)
        return refs

    def _give_back(self, request_id: str, refs: list[BlockRef]) -> None:
        by_instance: dict[int, list[BlockRef]] = {}
        for ref in refs:
            by_instance.setdefault(ref.instance, []).append(ref)
        for instance, group in by_instance.items():
            with self.lock:
                if instance == self.home:
                    self.rm.release(request_id, group)
                    continue
                self.rm.forget_borrowed(request_id, instance, group)
            assert self.peers is not None
            self.peers.release(instance, request_id, [r.block for r in group])

    # ----------------------------------------------------------------- release
    def free(self, request_id: str) -> None:
        """Release every block and reservation of the request, here and on its creditors."""
        with self.lock:
            self.rm.free_request(request_id)
            creditors = self.rm.borrowed_ledger.get(request_id, {})
            for creditor, ids in creditors.items():
                self.rm.forget_borrowed(request_id, creditor, [BlockRef(creditor, b) for b in ids])
        for creditor in creditors:
            assert self.peers is not None
            self.peers.release(creditor, request_id, None)
        self._tables.pop(request_id, None)
        self._reserved.pop(request_id, None)
        self._counts.pop(request_id, None)

    # ---------------------------------------------------------------- migration
    def reserve(self, request_id: str, instance: int, copy_tags: list[int]) -> Optional[list[BlockRef]]:
        """Reserve-first: one block on `instance` per migration copy (None if refused)."""
        if request_id not in self._tables:
            raise ValueError(f"cannot reserve blocks for unknown request {request_id!r}")
        if self.placement == "static" and instance != self.home:
            raise ValueError("the static placement policy keeps every block on the home instance")
        if instance == self.home:
            with self.lock:
                refs = self.rm.reserve(self.home, request_id, len(copy_tags), copy_tags)
        else:
            refs = self._borrow(instance, request_id, len(copy_tags), None, copy_tags)
        if refs:
            self._reserved.setdefault(request_id, []).extend(refs)
        return refs

    def commit_move(self, request_id: str, index: int, new_ref: BlockRef) -> BlockRef:
        """After a copy: table[index] = new_ref (a reservation), the old block is released."""
        table = self._tables[request_id]
        reserved = self._reserved.get(request_id, [])
        if new_ref not in reserved:
            raise ValueError(f"{new_ref} is not a reservation of request {request_id!r}")
        old = table[index]
        reserved.remove(new_ref)
        if not reserved:
            del self._reserved[request_id]
        table[index] = new_ref
        counts = self._counts[request_id]
        counts[old.instance] -= 1
        counts[new_ref.instance] += 1
        if not counts[old.instance]:
            del counts[old.instance]
        if new_ref.instance != self.home:
            assert self.peers is not None
            self.peers.attach(new_ref.instance, request_id, index, new_ref.block)
        self._give_back(request_id, [old])
        return old

    def cancel_reservation(self, request_id: str, refs: list[BlockRef]) -> None:
        reserved = self._reserved.get(request_id, [])
        for ref in refs:
            reserved.remove(ref)
        if not reserved:
            self._reserved.pop(request_id, None)
        self._give_back(request_id, refs)
