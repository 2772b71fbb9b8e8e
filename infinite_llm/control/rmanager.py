"""rManager: one instance's KV block bookkeeping (pure Python, no torch).

Each instance owns a BlockPool. Its blocks are used either by requests homed on the instance
("own" blocks) or lent to another instance on behalf of one of that instance's requests. Local
and remote allocation go through the same pool; lending is capped (`lend_cap`) so an instance
always keeps room for its own requests. A remote allocation the instance cannot satisfy from
its own pool is refused: a creditor never borrows from a third instance to serve a lend, so
borrowing never cascades.

Two ledgers make debts explicit on both sides:
- the lender's ``lent`` ledger: borrower instance -> request -> block ids (on the lender),
- the borrower's ``borrowed`` ledger: request -> creditor instance -> block ids (on the creditor).
The two sides are kept in agreement by messages (borrow -> grant/refuse -> release; see
`control/messages.py`) and checked by `control/invariants.py`.

For blocks it lends, the rManager also records which position of the borrower's block table each
holds (the guest index): a holder serves attention over a guest request by looking its blocks up
here, so a query message names only the request, never its blocks. A migration reservation is a
lent block without a position until the borrower attaches it.
"""

from __future__ import annotations

from typing import Iterable, Optional

from infinite_llm.control.blocks import BlockPool
from infinite_llm.control.plan import BlockRef


# Marks a block in `_holder` as used by a request homed on this instance (not lent).
_OWN = -1


class RManager:
    def __init__(self, instance_id: int, num_blocks: int, lend_cap: int) -> None:
        if instance_id < 0:
            raise ValueError(f"instance_id must be >= 0, got {instance_id}")
        if lend_cap < 0:
            raise ValueError(f"lend_cap must be >= 0, got {lend_cap}")
        self.instance_id = instance_id
        self.pool = BlockPool(num_blocks)
        self.lend_cap = lend_cap
        # request -> block ids, for requests homed here.
        self._own: dict[str, list[int]] = {}
        # borrower instance -> request -> block ids lent to it.
        self._lent: dict[int, dict[str, list[int]]] = {}
        # request (homed here) -> creditor instance -> block ids held there.
        self._borrowed: dict[str, dict[int, list[int]]] = {}
        # block id -> (borrower or _OWN, request): who uses each allocated block, for O(1) release.
        self._holder: dict[int, tuple[int, str]] = {}
        # request (homed elsewhere) -> table position -> block id, for attached lent blocks.
        self._guest_index: dict[str, dict[int, int]] = {}
        # reserved block -> the migration copy allowed to fill it.
        self._copy_tags: dict[int, int] = {}
        self._num_lent = 0
        self._num_borrowed = 0
        # Set while a request homed here waits for memory: none of it is lent to other homes.
        self.lending_paused = False
        # (borrower, request) lent to requests larger than one instance, which give blocks back.
        self._yielding: set[tuple[int, str]] = set()

    # ------------------------------------------------------------------ counters
    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_lent(self) -> int:
        return self._num_lent

    @property
    def num_borrowed(self) -> int:
        return self._num_borrowed

    @property
    def lendable(self) -> int:
        """How many blocks a lend (or reservation) could get right now."""
        if self.lending_paused:
            return 0
        return max(0, min(self.pool.num_free, self.lend_cap - self._num_lent))

    @property
    def lent_ledger(self) -> dict[int, dict[str, list[int]]]:
        """borrower instance -> request -> lent block ids (a copy)."""
        return {b: {r: list(ids) for r, ids in reqs.items()} for b, reqs in self._lent.items()}

    @property
    def borrowed_ledger(self) -> dict[str, dict[int, list[int]]]:
        """request -> creditor instance -> borrowed block ids (a copy)."""
        return {r: {c: list(ids) for c, ids in cr.items()} for r, cr in self._borrowed.items()}

    def yielding_lent(self) -> dict[str, tuple[int, int]]:
        """request -> (borrower, blocks lent to it) for lent requests larger than one instance."""
        return {rid: (b, len(self._lent.get(b, {}).get(rid, []))) for b, rid in self._yielding}

    def own_blocks(self) -> dict[str, list[int]]:
        """request homed here -> its block ids on this instance (a copy)."""
        return {r: list(ids) for r, ids in self._own.items()}

    # ---------------------------------------------------------------- allocation
    def allocate_local(self, request_id: str, n: int) -> Optional[list[BlockRef]]:
        """Blocks for a request homed here; None (nothing taken) if fewer than n are free.

        Local allocation ignores the lend cap: the cap only limits what others may take.
        """
        _check_count(n)
        if n > self.pool.num_free:
            return None
        ids = self.pool.allocate(n)
        if ids:
            self._own.setdefault(request_id, []).extend(ids)
            for block in ids:
                self._holder[block] = (_OWN, request_id)
        return [BlockRef(self.instance_id, b) for b in ids]

    def lend(
        self, borrower: int, request_id: str, n: int, indices: Optional[list[int]] = None, yields: bool = False
    ) -> Optional[list[BlockRef]]:
        """A remote allocation on behalf of instance `borrower`, from this pool only.

        Refused (None, nothing taken) if n exceeds the free blocks or would push the blocks
        lent past `lend_cap`. `indices`: the table positions the blocks take (guest index);
        None for a migration reservation, attached later.
        """
        _check_count(n)
        if indices is not None:
            if len(indices) != n or len(set(indices)) != n:
                raise ValueError(f"lend of {n} blocks needs {n} distinct table positions, got {indices}")
            taken = self._guest_index.get(request_id, {})
            clash = [i for i in indices if i in taken]
            if clash:
                raise ValueError(f"request {request_id!r} already has blocks here at positions {clash}")
        if borrower == self.instance_id:
            raise ValueError(
                f"instance {self.instance_id} cannot lend to itself; use allocate_local"
            )
        if borrower < 0:
            raise ValueError(f"borrower instance must be >= 0, got {borrower}")
        if n > self.pool.num_free:
            return None
        if self._num_lent + n > self.lend_cap or (n and self.lending_paused):
            return None
        ids = self.pool.allocate(n)
        if ids:
            self._lent.setdefault(borrower, {}).setdefault(request_id, []).extend(ids)
            for block in ids:
                self._holder[block] = (borrower, request_id)
            self._num_lent += len(ids)
            if yields:
                self._yielding.add((borrower, request_id))
            if indices is not None:
                self._guest_index.setdefault(request_id, {}).update(zip(indices, ids))
        return [BlockRef(self.instance_id, b) for b in ids]

    def reserve(self, borrower: int, request_id: str, n: int,
                copy_tags: Optional[list[int]] = None) -> Optional[list[BlockRef]]:
        """Reserve-first space for a migration into this instance.

        For another instance's request it is a lend without table positions (counted as lent,
        capped); for a request homed here (a block moving back home) a local allocation.
        `copy_tags` name the copies that will fill the blocks: only the copy with a block's tag
        may write it (`accepts_copy`), so a late copy of an aborted or preempted attempt can
        never land in a block that was freed and reserved again.
        """
        if copy_tags is not None and len(copy_tags) != n:
            raise ValueError(f"reserve of {n} blocks needs {n} copy tags, got {len(copy_tags)}")
        refs = self.allocate_local(request_id, n) if borrower == self.instance_id else self.lend(borrower, request_id, n)
        if refs and copy_tags is not None:
            self._copy_tags.update(zip((r.block for r in refs), copy_tags))
        return refs

    def accepts_copy(self, request_id: str, block: int, tag: int) -> bool:
        """Whether the copy `tag` may write `block` (reserved for it, for this request)."""
        return self.holds(request_id, block) and self._copy_tags.get(block) == tag

    def attach(self, request_id: str, index: int, block: int) -> None:
        """A reserved lent block now holds table position `index` of the request."""
        holder = self._holder.get(block)
        if holder is None or holder[0] == _OWN or holder[1] != request_id:
            raise ValueError(f"block {block} of instance {self.instance_id} is not lent for {request_id!r}")
        table = self._guest_index.setdefault(request_id, {})
        if index in table or block in table.values():
            raise ValueError(f"request {request_id!r}: position {index} or block {block} is already attached")
        table[index] = block
        self._copy_tags.pop(block, None)

    def guest_blocks(self, request_id: str) -> list[tuple[int, int]]:
        """(table position, block id) of the attached blocks lent for the request, by position."""
        return sorted(self._guest_index.get(request_id, {}).items())

    def holds(self, request_id: str, block: int) -> bool:
        """Whether `block` is allocated here for `request_id` (own, lent or reserved)."""
        holder = self._holder.get(block)
        return holder is not None and holder[1] == request_id

    def record_borrowed(self, request_id: str, creditor: int, blocks: Iterable[BlockRef]) -> None:
        """Home side of a lend arranged elsewhere (e.g. by the cluster KV manager)."""
        refs = list(blocks)
        for ref in refs:
            if ref.instance != creditor:
                raise ValueError(f"{ref} is not on creditor instance {creditor}")
        self._record_borrowed(request_id, creditor, [r.block for r in refs])

    def _record_borrowed(self, request_id: str, creditor: int, ids: list[int]) -> None:
        if creditor == self.instance_id:
            raise ValueError(f"instance {self.instance_id} cannot be its own creditor")
        if ids:
            self._borrowed.setdefault(request_id, {}).setdefault(creditor, []).extend(ids)
            self._num_borrowed += len(ids)

    # ------------------------------------------------------------------- release
    def release(self, request_id: str, blocks: Iterable[BlockRef]) -> None:
        """Free specific blocks held here for `request_id` (own or lent).

        Validates everything first: a block on another instance, not allocated, used by a
        different request, or listed twice raises ValueError and nothing is freed.
        """
        refs = list(blocks)
        ids: list[int] = []
        for ref in refs:
            if ref.instance != self.instance_id:
                raise ValueError(f"{ref} is not on instance {self.instance_id}")
            holder = self._holder.get(ref.block)
            if holder is None or holder[1] != request_id:
                raise ValueError(
                    f"block {ref.block} of instance {self.instance_id} is not held for "
                    f"request {request_id!r}"
                )
            ids.append(ref.block)
        if len(set(ids)) != len(ids):
            raise ValueError(f"release() of request {request_id!r} lists a block twice: {ids}")
        # Group by holder so each ledger list is filtered once (long requests free thousands).
        by_holder: dict[int, set[int]] = {}
        for block in ids:
            self._copy_tags.pop(block, None)
            borrower, _ = self._holder.pop(block)
            by_holder.setdefault(borrower, set()).add(block)
        for borrower, gone in by_holder.items():
            if borrower == _OWN:
                _remove_from(self._own, request_id, gone)
            else:
                self._forget_guest(request_id, gone)
                _remove_from(self._lent[borrower], request_id, gone)
                if request_id not in self._lent[borrower]:
                    self._yielding.discard((borrower, request_id))
                if not self._lent[borrower]:
                    del self._lent[borrower]
                self._num_lent -= len(gone)
        self.pool.free(ids)

    def _forget_guest(self, request_id: str, gone: set[int]) -> None:
        table = self._guest_index.get(request_id)
        if table is None:
            return
        for index in [i for i, b in table.items() if b in gone]:
            del table[index]
        if not table:
            del self._guest_index[request_id]

    def release_lent(self, borrower: int, request_id: str, blocks: Optional[list[int]] = None) -> list[int]:
        """Creditor side of a `ReleaseBlocks`: free the listed blocks lent to `borrower` for the
        request (None: all of them). Returns the ids freed."""
        held = self._lent.get(borrower, {}).get(request_id, [])
        ids = list(held) if blocks is None else list(blocks)
        if ids:
            self.release(request_id, [BlockRef(self.instance_id, b) for b in ids])
        return ids

    def forget_borrowed(self, request_id: str, creditor: int, blocks: Iterable[BlockRef]) -> None:
        """Home side of a release on `creditor`: drop those blocks from the borrowed ledger.

        ValueError (nothing changed) if a block is not recorded as borrowed from `creditor`.
        """
        refs = list(blocks)
        recorded = self._borrowed.get(request_id, {}).get(creditor, [])
        recorded_set = set(recorded)
        gone: set[int] = set()
        for ref in refs:
            if ref.instance != creditor or ref.block not in recorded_set or ref.block in gone:
                raise ValueError(
                    f"{ref} is not recorded as borrowed from instance {creditor} for request "
                    f"{request_id!r}"
                )
            gone.add(ref.block)
        if not refs:
            return
        remaining = [b for b in recorded if b not in gone]
        if remaining:
            self._borrowed[request_id][creditor] = remaining
        else:
            del self._borrowed[request_id][creditor]
            if not self._borrowed[request_id]:
                del self._borrowed[request_id]
        self._num_borrowed -= len(refs)

    def free_request(self, request_id: str) -> list[BlockRef]:
        """Free every block this instance holds for the request (own, then lent); return them.

        The home's borrowed ledger is not touched: the caller tells the home with
        `forget_borrowed` for the blocks returned by each creditor.
        """
        refs = self.blocks_held(request_id)
        if refs:
            self.release(request_id, refs)
        return refs

    def blocks_held(self, request_id: str) -> list[BlockRef]:
        """Blocks of this pool used by the request: own blocks first, then lent (by borrower)."""
        ids = list(self._own.get(request_id, []))
        for borrower in sorted(self._lent):
            ids.extend(self._lent[borrower].get(request_id, []))
        return [BlockRef(self.instance_id, b) for b in ids]

    def home_requests(self) -> list[str]:
        """Requests homed here that hold blocks here or elsewhere."""
        return sorted(set(self._own) | set(self._borrowed))

    def __repr__(self) -> str:
        return (
            f"RManager(instance={self.instance_id}, free={self.num_free}/{self.pool.num_blocks}, "
            f"lent={self.num_lent}/{self.lend_cap}, borrowed={self.num_borrowed})"
        )


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"number of blocks must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"number of blocks must be >= 0, got {n}")


def _remove_from(table: dict[str, list[int]], request_id: str, gone: set[int]) -> None:
    kept = [b for b in table[request_id] if b not in gone]
    if kept:
        table[request_id] = kept
    else:
        del table[request_id]
