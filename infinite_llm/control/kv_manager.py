"""The cluster-level KV cache manager the scheduler talks to (pure Python, no torch).

It owns one rManager per instance and the gManager, keeps each request's block table (the
ordered list of BlockRefs the data plane reads), and implements the three placement policies:

- ``static``   (vLLM-multi): a request's blocks all live on its home instance.
- ``striped``  (vLLM-single, one big pooled instance): block i of a request goes to instance
  ``(home + i) % N``, or to the next instance with room when that one is full; no lend cap.
- ``infinite`` (Infinite-LLM): the home pool first, then blocks borrowed from the creditors the
  gManager names, best first, each within its lend cap.

Every operation is atomic: it either does all of its work or raises/returns a refusal with no
state changed. The rManagers and the gManager share this process, so after each change the
gManager's block counts are refreshed at once (the timestamp stays that of the last periodic
heartbeat, which is what liveness is judged on): creditor lookups never see stale counts and
`can_allocate` always agrees with `allocate`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Iterable, Optional

from infinite_llm.control.gmanager import GManager
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager

PLACEMENT_POLICIES = ("static", "striped", "infinite")

# An allocation plan: (instance, number of blocks) runs, in block-table order.
_Plan = list[tuple[int, int]]


class ClusterKVManager:
    def __init__(
        self,
        num_instances: int,
        num_blocks_per_instance: int,
        block_size: int,
        lend_fraction: float = 0.9,
        placement: str = "infinite",
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if num_blocks_per_instance < 0:
            raise ValueError(f"num_blocks_per_instance must be >= 0, got {num_blocks_per_instance}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= lend_fraction <= 1.0:
            raise ValueError(f"lend_fraction must be in [0, 1], got {lend_fraction}")
        if placement not in PLACEMENT_POLICIES:
            raise ValueError(
                f"unknown placement policy {placement!r}; expected one of {PLACEMENT_POLICIES}"
            )
        self.num_instances = num_instances
        self.num_blocks_per_instance = num_blocks_per_instance
        self.block_size = block_size
        self.lend_fraction = lend_fraction
        self.placement = placement
        self.lend_cap = math.floor(lend_fraction * num_blocks_per_instance)
        self.rmanagers: list[RManager] = [
            RManager(i, num_blocks_per_instance, self.lend_cap) for i in range(num_instances)
        ]
        self.gmanager = GManager(num_instances)
        self._tables: dict[str, list[BlockRef]] = {}
        self._homes: dict[str, int] = {}
        # Reserve-first migration targets, not yet in the table.
        self._reservations: dict[str, list[BlockRef]] = {}
        self._heartbeat_time: list[float] = [0.0] * num_instances
        # (num_home_requests, num_home_tokens) per instance as of the last heartbeat.
        self._home_stats: list[tuple[int, int]] = [(0, 0)] * num_instances
        self._publish(range(num_instances))

    # ------------------------------------------------------------------ queries
    def block_table(self, request_id: str) -> list[BlockRef]:
        """The request's blocks in sequence order (a copy; [] if unknown)."""
        return list(self._tables.get(request_id, []))

    def home_of(self, request_id: str) -> Optional[int]:
        return self._homes.get(request_id)

    def reservations(self, request_id: str) -> list[BlockRef]:
        return list(self._reservations.get(request_id, []))

    def requests(self) -> list[str]:
        """Requests that hold blocks or reservations."""
        return list(self._homes)

    def num_blocks_needed(self, request_id: str, total_tokens: int) -> int:
        """How many more blocks the request needs for its table to cover `total_tokens`."""
        _check_tokens(total_tokens)
        have = len(self._tables.get(request_id, []))
        return max(0, -(-total_tokens // self.block_size) - have)

    def max_tokens_for_request(self, home: int) -> int:
        """The largest context one request homed at `home` could ever hold under this policy,
        with the rest of the cluster empty."""
        self._check_instance(home)
        per = self.num_blocks_per_instance
        if self.placement == "static":
            blocks = per
        elif self.placement == "striped":
            blocks = per * self.num_instances
        else:
            blocks = per + (self.num_instances - 1) * min(self.lend_cap, per)
        return blocks * self.block_size

    def num_free_blocks(self, instance: Optional[int] = None) -> int:
        if instance is None:
            return sum(rm.num_free for rm in self.rmanagers)
        self._check_instance(instance)
        return self.rmanagers[instance].num_free

    def num_used_blocks(self, instance: Optional[int] = None) -> int:
        if instance is None:
            return sum(rm.pool.num_used for rm in self.rmanagers)
        self._check_instance(instance)
        return self.rmanagers[instance].pool.num_used

    def usage(self, instance: int) -> dict[str, int]:
        self._check_instance(instance)
        rm = self.rmanagers[instance]
        return {
            "total": rm.pool.num_blocks,
            "used": rm.pool.num_used,
            "free": rm.num_free,
            "lent": rm.num_lent,
            "borrowed": rm.num_borrowed,
            "lendable": rm.lendable,
        }

    # --------------------------------------------------------------- allocation
    def can_allocate(self, request_id: str, home: int, total_tokens: int) -> bool:
        """Whether `allocate` with the same arguments would succeed now."""
        self._check_home(request_id, home)
        return self._plan(request_id, home, total_tokens) is not None

    def allocate(self, request_id: str, home: int, total_tokens: int) -> bool:
        """Grow the request's table to cover `total_tokens` (never shrinks it).

        All the needed blocks or none: on False nothing changed. The first allocation of a
        request fixes its home until `free`.
        """
        self._check_home(request_id, home)
        plan = self._plan(request_id, home, total_tokens)
        if plan is None:
            return False
        if not plan:
            return True
        new_refs = self._execute(request_id, home, plan)
        self._homes.setdefault(request_id, home)
        self._tables.setdefault(request_id, []).extend(new_refs)
        self.gmanager.record_placement(request_id, home, new_refs)
        self._publish({home} | {ref.instance for ref in new_refs})
        return True

    def _plan(self, request_id: str, home: int, total_tokens: int) -> Optional[_Plan]:
        need = self.num_blocks_needed(request_id, total_tokens)
        if need == 0:
            return []
        if self.placement == "static" or self.num_instances == 1:
            return [(home, need)] if need <= self.rmanagers[home].num_free else None
        if self.placement == "striped":
            return self._plan_striped(request_id, home, need)
        return self._plan_infinite(home, need)

    def _plan_infinite(self, home: int, need: int) -> Optional[_Plan]:
        plan: _Plan = []
        local = min(need, self.rmanagers[home].num_free)
        if local:
            plan.append((home, local))
        remaining = need - local
        if remaining:
            for creditor in self.gmanager.candidate_creditors(home, remaining):
                # What the creditor's rManager would grant (its pool and lend cap only).
                take = min(remaining, self.rmanagers[creditor].lendable)
                if take:
                    plan.append((creditor, take))
                    remaining -= take
                if not remaining:
                    break
        return plan if remaining == 0 else None

    def _plan_striped(self, request_id: str, home: int, need: int) -> Optional[_Plan]:
        n = self.num_instances
        free = [rm.num_free for rm in self.rmanagers]
        start = len(self._tables.get(request_id, []))
        plan: _Plan = []
        for index in range(start, start + need):
            preferred = (home + index) % n
            target = next(
                ((preferred + k) % n for k in range(n) if free[(preferred + k) % n] > 0), None
            )
            if target is None:
                return None
            free[target] -= 1
            if plan and plan[-1][0] == target:
                plan[-1] = (target, plan[-1][1] + 1)
            else:
                plan.append((target, 1))
        return plan

    def _execute(self, request_id: str, home: int, plan: _Plan) -> list[BlockRef]:
        """Carry out a plan made on the current state; undo everything if any step is refused."""
        home_rm = self.rmanagers[home]
        done: list[BlockRef] = []
        for instance, count in plan:
            if instance == home:
                refs = home_rm.allocate_local(request_id, count)
            else:
                refs = home_rm.borrow(
                    self.rmanagers[instance], request_id, count,
                    ignore_cap=self.placement == "striped",
                )
            if refs is None:
                self._release_refs(request_id, home, done)
                raise RuntimeError(
                    f"instance {instance} refused {count} blocks for request {request_id!r} "
                    "that the plan counted on (state changed behind the KV manager?)"
                )
            done.extend(refs)
        return done

    # ----------------------------------------------------------------- release
    def free(self, request_id: str) -> None:
        """Release every block and reservation of the request everywhere; idempotent."""
        home = self._homes.get(request_id)
        if home is None:
            return
        home_rm = self.rmanagers[home]
        touched = {home}
        for rm in self.rmanagers:
            refs = rm.free_request(request_id)
            if refs:
                touched.add(rm.instance_id)
                if rm.instance_id != home:
                    home_rm.forget_borrowed(request_id, rm.instance_id, refs)
        self._tables.pop(request_id, None)
        self._reservations.pop(request_id, None)
        del self._homes[request_id]
        self.gmanager.remove_placement(request_id)
        self._publish(touched)

    def _release_refs(self, request_id: str, home: int, refs: Iterable[BlockRef]) -> None:
        by_instance: dict[int, list[BlockRef]] = {}
        for ref in refs:
            by_instance.setdefault(ref.instance, []).append(ref)
        for instance, group in by_instance.items():
            self.rmanagers[instance].release(request_id, group)
            if instance != home:
                self.rmanagers[home].forget_borrowed(request_id, instance, group)

    # ---------------------------------------------------------------- migration
    def reserve_on(self, instance: int, request_id: str, n: int) -> Optional[list[BlockRef]]:
        """Reserve n blocks on `instance` as migration targets for the request (reserve-first).

        A reservation on another instance is a lend (lend cap applies); on the home it is a
        local allocation. None (nothing reserved) if the instance cannot provide all n.
        """
        self._check_instance(instance)
        home = self._homes.get(request_id)
        if home is None:
            raise ValueError(f"cannot reserve blocks for unknown request {request_id!r}")
        if n < 0:
            raise ValueError(f"number of blocks to reserve must be >= 0, got {n}")
        if self.placement == "static" and instance != home:
            raise ValueError(
                "the static placement policy keeps every block on the home instance; "
                f"cannot reserve on instance {instance} for request {request_id!r} "
                f"homed on {home}"
            )
        if n == 0:
            return []
        if instance == home:
            refs = self.rmanagers[home].reserve(home, request_id, n)
        else:
            refs = self.rmanagers[home].borrow(
                self.rmanagers[instance], request_id, n, reservation=True
            )
        if refs is None:
            return None
        self._reservations.setdefault(request_id, []).extend(refs)
        self._publish({home, instance})
        return list(refs)

    def cancel_reservation(self, request_id: str, refs: list[BlockRef]) -> None:
        """Give back reserved blocks that will not be used (all listed ones, or none)."""
        reserved = self._reservations.get(request_id, [])
        self._check_reserved(request_id, reserved, refs)
        if not refs:
            return
        home = self._homes[request_id]
        self._release_refs(request_id, home, refs)
        gone = set(refs)
        kept = [r for r in reserved if r not in gone]
        if kept:
            self._reservations[request_id] = kept
        else:
            del self._reservations[request_id]
        self._forget_if_empty(request_id)
        self._publish({home} | {r.instance for r in refs})

    def replace_block(self, request_id: str, index: int, new_ref: BlockRef) -> BlockRef:
        """After a migration copy: table[index] = new_ref (a reservation of this request);
        frees the old block and returns it."""
        table = self._tables.get(request_id)
        if table is None:
            raise ValueError(f"unknown request {request_id!r}")
        if not 0 <= index < len(table):
            raise IndexError(
                f"request {request_id!r} has {len(table)} blocks; index {index} is out of range"
            )
        reserved = self._reservations.get(request_id, [])
        self._check_reserved(request_id, reserved, [new_ref])
        home = self._homes[request_id]
        old = table[index]
        table[index] = new_ref
        reserved.remove(new_ref)
        if not reserved:
            del self._reservations[request_id]
        self._release_refs(request_id, home, [old])
        self.gmanager.record_placement(request_id, home, [new_ref])
        self.gmanager.remove_placement(request_id, [old])
        self._publish({home, old.instance, new_ref.instance})
        return old

    def _check_reserved(
        self, request_id: str, reserved: list[BlockRef], refs: list[BlockRef]
    ) -> None:
        if request_id not in self._homes:
            raise ValueError(f"unknown request {request_id!r}")
        available = set(reserved)
        if len(set(refs)) != len(refs):
            raise ValueError(f"request {request_id!r}: a reservation is listed twice: {refs}")
        for ref in refs:
            if ref not in available:
                raise ValueError(f"{ref} is not a reservation of request {request_id!r}")

    def _forget_if_empty(self, request_id: str) -> None:
        if not self._tables.get(request_id) and not self._reservations.get(request_id):
            self._tables.pop(request_id, None)
            self._homes.pop(request_id, None)
            self.gmanager.remove_placement(request_id)

    # ---------------------------------------------------------------- heartbeats
    def heartbeat(self, now: float, home_stats: Optional[dict[int, tuple[int, int]]] = None) -> None:
        """Send every rManager's heartbeat to the gManager.

        home_stats[i] = (num_home_requests, num_home_tokens) as the scheduler sees instance i;
        for an instance it leaves out: the number of requests homed there and their table
        capacity in tokens.
        """
        stats = dict(home_stats or {})
        for i in stats:
            self._check_instance(i)
        homed_requests = [0] * self.num_instances
        homed_blocks = [0] * self.num_instances
        for request_id, home in self._homes.items():
            homed_requests[home] += 1
            homed_blocks[home] += len(self._tables.get(request_id, []))
        self._home_stats = [
            stats.get(i, (homed_requests[i], homed_blocks[i] * self.block_size))
            for i in range(self.num_instances)
        ]
        self._heartbeat_time = [now] * self.num_instances
        self._publish(range(self.num_instances))

    def _publish(self, instances: Iterable[int]) -> None:
        """Refresh the gManager's view of these instances' blocks. Load figures and the
        timestamp stay those of the last periodic heartbeat."""
        for i in instances:
            status = self.rmanagers[i].heartbeat(self._heartbeat_time[i])
            requests, tokens = self._home_stats[i]
            self.gmanager.heartbeat(
                replace(status, num_home_requests=requests, num_home_tokens=tokens)
            )

    # ---------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise AssertionError naming the first inconsistency found."""
        # 1. No block is in two table slots, two requests, or both a table and a reservation.
        owner: dict[BlockRef, str] = {}
        for request_id in set(self._tables) | set(self._reservations):
            assert request_id in self._homes, f"request {request_id!r} has blocks but no home"
            for ref in self._tables.get(request_id, []) + self._reservations.get(request_id, []):
                other = owner.get(ref)
                assert other is None, (
                    f"{ref} is used twice (requests {other!r} and {request_id!r})"
                )
                owner[ref] = request_id
                if self.placement == "static":
                    assert ref.instance == self._homes[request_id], (
                        f"static placement: {ref} of request {request_id!r} is off its home "
                        f"{self._homes[request_id]}"
                    )
        for request_id in self._homes:
            assert self._tables.get(request_id) or self._reservations.get(request_id), (
                f"request {request_id!r} is registered but holds nothing"
            )

        # 2. Each pool's allocated blocks are exactly the blocks some request uses (no leak),
        #    recorded on the right side (own for the home, lent to the home otherwise).
        expected: dict[int, dict[str, set[int]]] = {i: {} for i in range(self.num_instances)}
        for ref, request_id in owner.items():
            assert 0 <= ref.instance < self.num_instances, f"{ref} names no instance"
            expected[ref.instance].setdefault(request_id, set()).add(ref.block)
        for rm in self.rmanagers:
            i = rm.instance_id
            used = set().union(*expected[i].values()) if expected[i] else set()
            allocated = rm.pool.allocated_blocks()
            leaked = allocated - used
            assert not leaked, f"instance {i}: blocks {sorted(leaked)} are allocated but unused (leak)"
            dangling = used - allocated
            assert not dangling, f"instance {i}: blocks {sorted(dangling)} are used but not allocated"
            assert rm.pool.num_free + rm.pool.num_used == rm.pool.num_blocks, (
                f"instance {i}: free ({rm.pool.num_free}) + used ({rm.pool.num_used}) != "
                f"{rm.pool.num_blocks}"
            )
            own = {r: set(ids) for r, ids in rm.own_blocks().items()}
            lent = rm.lent_ledger
            for request_id, blocks in expected[i].items():
                home = self._homes[request_id]
                if home == i:
                    recorded = own.get(request_id, set())
                else:
                    recorded = set(lent.get(home, {}).get(request_id, []))
                assert recorded == blocks, (
                    f"instance {i}: request {request_id!r} (home {home}) uses blocks "
                    f"{sorted(blocks)} but the rManager records {sorted(recorded)}"
                )
            num_lent = sum(len(ids) for reqs in lent.values() for ids in reqs.values())
            assert num_lent == rm.num_lent, f"instance {i}: lent counter {rm.num_lent} != {num_lent}"
            if self.placement != "striped":
                assert rm.num_lent <= rm.lend_cap, (
                    f"instance {i} lent {rm.num_lent} blocks, past its cap {rm.lend_cap}"
                )

        # 3. Lender and borrower ledgers agree, entry by entry.
        lent_view: dict[tuple[int, int, str], list[int]] = {}
        for rm in self.rmanagers:
            for borrower, reqs in rm.lent_ledger.items():
                for request_id, ids in reqs.items():
                    lent_view[(rm.instance_id, borrower, request_id)] = sorted(ids)
        borrowed_view: dict[tuple[int, int, str], list[int]] = {}
        for rm in self.rmanagers:
            num_borrowed = 0
            for request_id, creditors in rm.borrowed_ledger.items():
                for creditor, ids in creditors.items():
                    borrowed_view[(creditor, rm.instance_id, request_id)] = sorted(ids)
                    num_borrowed += len(ids)
            assert num_borrowed == rm.num_borrowed, (
                f"instance {rm.instance_id}: borrowed counter {rm.num_borrowed} != {num_borrowed}"
            )
        assert lent_view == borrowed_view, (
            "lender and borrower ledgers disagree: "
            f"lent {_diff(lent_view, borrowed_view)} vs borrowed {_diff(borrowed_view, lent_view)}"
        )

        # 4. The gManager's placement map matches the tables (reservations are not placed yet).
        for request_id, table in self._tables.items():
            counts = dict(sorted(Counter(ref.instance for ref in table).items()))
            assert self.gmanager.placement(request_id) == counts, (
                f"gManager placement of {request_id!r} is {self.gmanager.placement(request_id)}, "
                f"tables say {counts}"
            )
            assert self.gmanager.home_of(request_id) == self._homes[request_id], (
                f"gManager homes {request_id!r} on {self.gmanager.home_of(request_id)}, "
                f"not {self._homes[request_id]}"
            )
        extra = set(self.gmanager.requests()) - {r for r, t in self._tables.items() if t}
        assert not extra, f"gManager places requests with no blocks: {sorted(extra)}"

        # 5. The gManager's block counts are current (refreshed after every change).
        for rm in self.rmanagers:
            status = self.gmanager.status(rm.instance_id)
            assert status is not None and (status.num_free, status.lendable) == (
                rm.num_free, rm.lendable
            ), f"gManager's view of instance {rm.instance_id} is stale: {status}"

    # ------------------------------------------------------------------- checks
    def _check_instance(self, instance: int) -> None:
        if not isinstance(instance, int) or not 0 <= instance < self.num_instances:
            raise ValueError(
                f"instance {instance!r} out of range (cluster has {self.num_instances})"
            )

    def _check_home(self, request_id: str, home: int) -> None:
        self._check_instance(home)
        known = self._homes.get(request_id)
        if known is not None and known != home:
            raise ValueError(
                f"request {request_id!r} is homed on instance {known}, not {home}; "
                "free it before moving its home"
            )


def _check_tokens(total_tokens: int) -> None:
    if not isinstance(total_tokens, int) or isinstance(total_tokens, bool):
        raise TypeError(f"total_tokens must be an int, got {type(total_tokens).__name__}")
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")


def _diff(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if b.get(k) != v}
