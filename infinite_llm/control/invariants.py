"""Cluster-wide KV invariants, checked from every instance's control state (pure Python).

Only meaningful when no message is in flight (tests quiesce the cluster first):
1. no block is used twice: every table slot and reservation names a distinct block;
2. every allocated block of every pool is used by exactly one request (no leak), recorded on the
   right side: own for its home, lent to its home otherwise;
3. lender and borrower ledgers agree entry by entry (every lent block is in exactly one ledger
   on each side);
4. each holder's guest index places exactly the home's table entries that live there;
5. a lent request marked as yielding still holds lent blocks there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from infinite_llm.control.home_kv import HomeKV
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager


class HomeTablesView(Protocol):
    home: int
    placement: str

    def requests(self) -> list[str]: ...
    def block_table(self, request_id: str) -> list[BlockRef]: ...
    def reservations(self, request_id: str) -> list[BlockRef]: ...


@dataclass
class HomeTables:
    """A picklable copy of a HomeKV's tables (to check instances in other processes)."""

    home: int
    placement: str
    tables: dict[str, list[BlockRef]]
    reserved: dict[str, list[BlockRef]]

    @classmethod
    def of(cls, kv: HomeKV) -> "HomeTables":
        ids = kv.requests()
        return cls(kv.home, kv.placement, {r: list(kv.block_table(r)) for r in ids},
                   {r: kv.reservations(r) for r in ids})

    def requests(self) -> list[str]:
        return list(self.tables)

    def block_table(self, request_id: str) -> list[BlockRef]:
        return self.tables.get(request_id, [])

    def reservations(self, request_id: str) -> list[BlockRef]:
        return self.reserved.get(request_id, [])


def check_cluster(rmanagers: Sequence[RManager], homes: Sequence[HomeTablesView]) -> None:
    """Raise AssertionError naming the first inconsistency found."""
    owner = _owners(homes)
    _check_pools(rmanagers, owner)
    _check_ledgers(rmanagers)
    _check_guest_index(rmanagers, homes)


def _owners(homes: Sequence[HomeTablesView]) -> dict[BlockRef, tuple[str, int]]:
    owner: dict[BlockRef, tuple[str, int]] = {}
    for kv in homes:
        for request_id in kv.requests():
            for ref in kv.block_table(request_id) + kv.reservations(request_id):
                other = owner.get(ref)
                assert other is None, f"{ref} is used twice (requests {other} and {request_id!r})"
                owner[ref] = (request_id, kv.home)
                if kv.placement == "static":
                    assert ref.instance == kv.home, f"static placement: {ref} of {request_id!r} is off its home"
    return owner


def _check_pools(rmanagers: Sequence[RManager], owner: dict[BlockRef, tuple[str, int]]) -> None:
    for rm in rmanagers:
        i = rm.instance_id
        used = {ref.block: who for ref, who in owner.items() if ref.instance == i}
        allocated = rm.pool.allocated_blocks()
        leaked = allocated - set(used)
        assert not leaked, f"instance {i}: blocks {sorted(leaked)} are allocated but unused (leak)"
        dangling = set(used) - allocated
        assert not dangling, f"instance {i}: blocks {sorted(dangling)} are used but not allocated"
        own = {(r, b) for r, ids in rm.own_blocks().items() for b in ids}
        lent = {(r, b, borrower) for borrower, reqs in rm.lent_ledger.items() for r, ids in reqs.items() for b in ids}
        for block, (request_id, home) in used.items():
            if home == i:
                assert (request_id, block) in own, f"instance {i}: block {block} of {request_id!r} not recorded as own"
            else:
                assert (request_id, block, home) in lent, (
                    f"instance {i}: block {block} of {request_id!r} not recorded as lent to {home}"
                )
        assert len(own) + len(lent) == len(allocated), f"instance {i}: ledgers count {len(own) + len(lent)} blocks"
        assert rm.num_lent == len(lent), f"instance {i}: lent counter {rm.num_lent} != {len(lent)}"
        assert rm.num_lent <= rm.lend_cap, f"instance {i} lent {rm.num_lent} blocks, past its cap {rm.lend_cap}"
        for request_id, (borrower, n) in rm.yielding_lent().items():
            assert n > 0, f"instance {i}: {request_id!r} of instance {borrower} yields but holds no lent block"


def _check_ledgers(rmanagers: Sequence[RManager]) -> None:
    lent = {(rm.instance_id, borrower, r): sorted(ids)
            for rm in rmanagers for borrower, reqs in rm.lent_ledger.items() for r, ids in reqs.items()}
    borrowed = {(creditor, rm.instance_id, r): sorted(ids)
                for rm in rmanagers for r, creditors in rm.borrowed_ledger.items() for creditor, ids in creditors.items()}
    assert lent == borrowed, (
        "lender and borrower ledgers disagree: "
        f"lent {_diff(lent, borrowed)} vs borrowed {_diff(borrowed, lent)}"
    )
    for rm in rmanagers:
        count = sum(len(ids) for creditors in rm.borrowed_ledger.values() for ids in creditors.values())
        assert count == rm.num_borrowed, f"instance {rm.instance_id}: borrowed counter {rm.num_borrowed} != {count}"


def _check_guest_index(rmanagers: Sequence[RManager], homes: Sequence[HomeTablesView]) -> None:
    by_id = {rm.instance_id: rm for rm in rmanagers}
    for kv in homes:
        for request_id in kv.requests():
            expected: dict[int, list[tuple[int, int]]] = {}
            for index, ref in enumerate(kv.block_table(request_id)):
                if ref.instance != kv.home:
                    expected.setdefault(ref.instance, []).append((index, ref.block))
            for instance, rm in by_id.items():
                if instance == kv.home:
                    continue
                got = rm.guest_blocks(request_id)
                assert got == expected.get(instance, []), (
                    f"instance {instance}: guest index of {request_id!r} is {got}, "
                    f"the home's table says {expected.get(instance, [])}"
                )


def _diff(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if b.get(k) != v}
