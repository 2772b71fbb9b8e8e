"""gManager: the cluster-wide view of the distributed KV cache (pure Python, no torch).

It never allocates anything itself. It learns each instance's block counts from rManager
heartbeats, keeps the placement map (which instance holds how many blocks of which request,
and where each request is homed; the debt ledger is derived from it), and answers "who can
lend to me?" with candidate creditors, best first. The rebalancer plans migrations on top of
this view.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import InstanceStatus


class GManager:
    def __init__(self, num_instances: int, heartbeat_timeout_s: float = 10.0) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self.num_instances = num_instances
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._status: list[Optional[InstanceStatus]] = [None] * num_instances
        # request -> instance -> number of blocks held there.
        self._placement: dict[str, Counter[int]] = {}
        self._home: dict[str, int] = {}

    # ---------------------------------------------------------------- heartbeats
    def heartbeat(self, status: InstanceStatus) -> None:
        """Record a heartbeat. One older than the latest from that instance is ignored
        (heartbeats may arrive out of order)."""
        self._check_instance(status.instance_id)
        current = self._status[status.instance_id]
        if current is not None and status.timestamp < current.timestamp:
            return
        self._status[status.instance_id] = status

    def status(self, instance_id: int) -> Optional[InstanceStatus]:
        self._check_instance(instance_id)
        return self._status[instance_id]

    def alive_instances(self, now: float) -> list[int]:
        """Instances whose latest heartbeat is at most `heartbeat_timeout_s` old at `now`."""
        return [
            i
            for i, s in enumerate(self._status)
            if s is not None and now - s.timestamp <= self.heartbeat_timeout_s
        ]

    def _latest_timestamp(self) -> Optional[float]:
        stamps = [s.timestamp for s in self._status if s is not None]
        return max(stamps) if stamps else None

    # ------------------------------------------------------------- placement map
    def record_placement(self, request_id: str, home: int, blocks: Iterable[BlockRef]) -> None:
        """Add blocks of a request to the map. A request has one home for its whole life."""
        self._check_instance(home)
        refs = list(blocks)
        for ref in refs:
            self._check_instance(ref.instance)
        known_home = self._home.get(request_id)
        if known_home is not None and known_home != home:
            raise ValueError(
                f"request {request_id!r} is homed on instance {known_home}, not {home}"
            )
        if not refs and request_id not in self._placement:
            return  # nothing to record; an empty request has no place in the map
        self._home[request_id] = home
        counts = self._placement.setdefault(request_id, Counter())
        for ref in refs:
            counts[ref.instance] += 1

    def remove_placement(
        self, request_id: str, blocks: Optional[Iterable[BlockRef]] = None
    ) -> None:
        """Remove some blocks of a request (or, with None, the whole request; idempotent).

        Removing more blocks from an instance than recorded there raises ValueError and
        changes nothing.
        """
        if blocks is None:
            self._placement.pop(request_id, None)
            self._home.pop(request_id, None)
            return
        refs = list(blocks)
        if not refs:
            return
        counts = self._placement.get(request_id)
        if counts is None:
            raise ValueError(f"request {request_id!r} has no recorded placement")
        removing = Counter(ref.instance for ref in refs)
        for instance, n in removing.items():
            if counts[instance] < n:
                raise ValueError(
                    f"request {request_id!r}: removing {n} blocks from instance {instance} "
                    f"but only {counts[instance]} are recorded there"
                )
        counts.subtract(removing)
        for instance in [i for i, n in counts.items() if n == 0]:
            del counts[instance]
        if not counts:
            del self._placement[request_id]
            del self._home[request_id]

    def placement(self, request_id: str) -> dict[int, int]:
        """instance -> number of the request's blocks held there ({} if unknown)."""
        return dict(sorted(self._placement.get(request_id, Counter()).items()))

    def home_of(self, request_id: str) -> Optional[int]:
        return self._home.get(request_id)

    def requests(self) -> list[str]:
        return list(self._placement)

    def debt_ledger(self) -> dict[tuple[int, int], int]:
        """(debtor = home, creditor) -> number of blocks the creditor holds for the debtor."""
        debts: Counter[tuple[int, int]] = Counter()
        for request_id, counts in self._placement.items():
            home = self._home[request_id]
            for instance, n in counts.items():
                if instance != home:
                    debts[(home, instance)] += n
        return dict(sorted(debts.items()))

    # ----------------------------------------------------------------- creditors
    def candidate_creditors(
        self, debtor: int, n_blocks: int, exclude: Iterable[int] = ()
    ) -> list[int]:
        """Instances that may lend to `debtor`, best first.

        Candidates: every instance other than the debtor (and `exclude`) whose latest
        heartbeat reports lendable > 0 and is not stale (at most `heartbeat_timeout_s` older
        than the newest heartbeat seen: an instance that stopped reporting is presumed dead).
        Those that can lend all `n_blocks` come first; within each group the most lendable
        first (fewest creditors per request), ties by lowest id (deterministic).
        """
        self._check_instance(debtor)
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        excluded = set(exclude)
        latest = self._latest_timestamp()
        candidates: list[InstanceStatus] = []
        for i, s in enumerate(self._status):
            if i == debtor or i in excluded or s is None or s.lendable <= 0:
                continue
            assert latest is not None
            if latest - s.timestamp > self.heartbeat_timeout_s:
                continue
            candidates.append(s)
        candidates.sort(key=lambda s: (s.lendable < n_blocks, -s.lendable, s.instance_id))
        return [s.instance_id for s in candidates]

    def _check_instance(self, instance_id: int) -> None:
        if not isinstance(instance_id, int) or not 0 <= instance_id < self.num_instances:
            raise ValueError(
                f"instance id {instance_id!r} out of range (cluster has {self.num_instances})"
            )
