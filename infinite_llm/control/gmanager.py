"""gManager: the cluster-wide view of the distributed KV cache (pure Python, no torch).

It never allocates anything itself, and it knows only what messages tell it. Every instance
sends a `Heartbeat` on a period (block counts, load, and the placements of its requests that
changed); from them the gManager keeps the global debt ledger (which instance holds how many
blocks of which request, and where each request is homed), answers "who can lend to me?" with
candidate creditors, best first, and periodically runs the greedy rebalancer on the perf model,
whose moves go to the requests' homes as `MigrationOrder`s.

Its view lags the instances by up to one heartbeat period: a creditor it names may have lent
its blocks meanwhile and refuse, and the home then asks the next candidate.

It also judges liveness. An instance is "suspect" once its heartbeats are a third of the
timeout late, and "dead" when they stop for `heartbeat_timeout_s`, when its step loop has not
gone round for that long (a wedged loop; the heartbeat thread still beats), or at once when
someone reports it failed. Dead is final: the id is never reused, its later heartbeats are
ignored, and its requests are forgotten here (their homes or the router recompute them).
Removing an instance on purpose takes the same path. Instances added later get new ids.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Optional

from infinite_llm.control.messages import Heartbeat, MigrationOrder, RequestPlacement
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.rebalancer import InstanceView, RebalancerConfig, RequestKV, plan_migrations


class GManager:
    def __init__(self, num_instances: int, heartbeat_timeout_s: float = 10.0) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.members: list[int] = list(range(num_instances))  # every id ever, dead ones too
        self._status: dict[int, Optional[Heartbeat]] = {i: None for i in self.members}
        self._received_at: dict[int, float] = {i: 0.0 for i in self.members}
        self._placements: dict[str, RequestPlacement] = {}
        self.dead: dict[int, str] = {}  # instance -> why it was declared dead

    def add_instance(self, instance_id: int) -> None:
        """A new member (ids are never reused: a replacement gets a new one)."""
        if not isinstance(instance_id, int) or instance_id < 0 or instance_id in self._status:
            raise ValueError(f"instance id {instance_id!r} is in use or invalid")
        self.members.append(instance_id)
        self._status[instance_id] = None
        self._received_at[instance_id] = 0.0

    def live_members(self) -> list[int]:
        return [i for i in self.members if i not in self.dead]

    # ---------------------------------------------------------------- heartbeats
    def heartbeat(self, beat: Heartbeat, now: float) -> bool:
        """Record a heartbeat received at `now`; an older one than the latest of that instance,
        or one from a dead instance, is ignored (False). Its placement changes update the debt
        ledger."""
        self._check_instance(beat.instance)
        if beat.instance in self.dead:
            return False
        current = self._status[beat.instance]
        if current is not None and beat.seq <= current.seq:
            return False
        self._status[beat.instance] = beat
        self._received_at[beat.instance] = now
        for request_id in beat.removed:
            placed = self._placements.get(request_id)
            if placed is not None and placed.home == beat.instance:
                del self._placements[request_id]
        for placement in beat.placements:
            self._placements[placement.request_id] = placement
        return True

    def status(self, instance_id: int) -> Optional[Heartbeat]:
        self._check_instance(instance_id)
        return self._status[instance_id]

    def alive_instances(self, now: float) -> list[int]:
        """Instances heard from at most `heartbeat_timeout_s` ago and not declared dead."""
        return [
            i for i, s in self._status.items()
            if s is not None and i not in self.dead and now - self._received_at[i] <= self.heartbeat_timeout_s
        ]

    # ---------------------------------------------------------------- liveness
    def host_of(self, instance_id: int) -> str:
        beat = self._status.get(instance_id)
        return beat.host if beat is not None else ""

    def heartbeat_age(self, instance_id: int, now: float) -> float:
        """Seconds since the instance's latest heartbeat arrived (inf: never heard from)."""
        if self._status[instance_id] is None:
            return math.inf
        return now - self._received_at[instance_id]

    def liveness(self, instance_id: int, now: float) -> str:
        """"alive", "suspect" (heartbeats late), "dead", or "starting" (never heard from)."""
        self._check_instance(instance_id)
        if instance_id in self.dead:
            return "dead"
        if self._status[instance_id] is None:
            return "starting"
        late = self.heartbeat_age(instance_id, now) > self.heartbeat_timeout_s / 3
        return "suspect" if late or self._loop_age(instance_id, now) > self.heartbeat_timeout_s / 3 else "alive"

    def _loop_age(self, instance_id: int, now: float) -> float:
        beat = self._status[instance_id]
        return beat.loop_age_s + self.heartbeat_age(instance_id, now) if beat is not None else 0.0

    def check_liveness(self, now: float) -> list[tuple[int, str]]:
        """Declare dead every instance whose heartbeats or step loop stopped for the timeout;
        returns (instance, reason) for each newly dead one."""
        newly = []
        for i, beat in self._status.items():
            if beat is None or i in self.dead:
                continue
            if self.heartbeat_age(i, now) > self.heartbeat_timeout_s:
                reason = f"no heartbeat for {self.heartbeat_age(i, now):.1f} s"
            elif self._loop_age(i, now) > self.heartbeat_timeout_s:
                reason = f"step loop stalled for {self._loop_age(i, now):.1f} s"
            else:
                continue
            self.declare_dead(i, reason)
            newly.append((i, reason))
        return newly

    def declare_dead(self, instance_id: int, reason: str) -> bool:
        """Mark the instance dead (False if it already was) and forget the requests homed on it
        and the placements that count blocks on it: their homes report again after recovery."""
        self._check_instance(instance_id)
        if instance_id in self.dead:
            return False
        self.dead[instance_id] = reason
        for request_id, placed in list(self._placements.items()):
            if placed.home == instance_id or instance_id in placed.tokens_by_instance:
                del self._placements[request_id]
        return True

    # ------------------------------------------------------------- placement map
    def placement(self, request_id: str) -> dict[int, int]:
        """instance -> KV tokens of the request held there ({} if unknown)."""
        placed = self._placements.get(request_id)
        return dict(placed.tokens_by_instance) if placed else {}

    def home_of(self, request_id: str) -> Optional[int]:
        placed = self._placements.get(request_id)
        return placed.home if placed else None

    def requests(self) -> list[str]:
        return list(self._placements)

    def debt_ledger(self) -> dict[tuple[int, int], int]:
        """(debtor = home, creditor) -> KV tokens the creditor holds for the debtor."""
        debts: Counter[tuple[int, int]] = Counter()
        for placed in self._placements.values():
            for instance, tokens in placed.tokens_by_instance.items():
                if instance != placed.home:
                    debts[(placed.home, instance)] += tokens
        return dict(sorted(debts.items()))

    # ----------------------------------------------------------------- creditors
    def candidate_creditors(self, debtor: int, n_blocks: int, now: float,
                            exclude: Iterable[int] = ()) -> list[tuple[int, int]]:
        """(instance, lendable) of instances that may lend to `debtor`, best first.

        Alive instances other than the debtor with lendable > 0 as last reported; those that can
        lend all `n_blocks` first, then those on the debtor's host (attention and copies stay off
        the network), then the most lendable (fewest creditors per request); ties by lowest id.
        """
        self._check_instance(debtor)
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        excluded = set(exclude) | {debtor}
        candidates = [
            (i, s.lendable) for i in self.alive_instances(now)
            if i not in excluded and (s := self._status[i]) is not None and s.lendable > 0
        ]
        host = self.host_of(debtor)
        candidates.sort(key=lambda c: (c[1] < n_blocks, self.host_of(c[0]) != host, -c[1], c[0]))
        return candidates

    # ---------------------------------------------------------------- rebalancer
    def cluster_view(self, block_size: int) -> tuple[list[InstanceView], list[RequestKV]]:
        """The rebalancer's inputs, as the heartbeats describe the cluster."""
        views = []
        for i, s in self._status.items():
            if s is None or i in self.dead:
                continue
            load = s.load
            if load.num_waiting:
                avg = load.waiting_tokens / load.num_waiting
            else:
                avg = load.running_tokens / load.batch_size if load.batch_size else 0.0
            views.append(InstanceView(
                instance_id=i, num_blocks=s.num_blocks, num_free=s.num_free, lendable=s.lendable,
                batch_size=load.batch_size, num_waiting_for_memory=load.num_waiting_for_memory,
                avg_request_tokens=avg, host=s.host,
            ))
        known = {v.instance_id for v in views}
        requests = [
            RequestKV(
                request_id=p.request_id, home=p.home, tokens_by_instance=dict(p.tokens_by_instance),
                movable_blocks=dict(p.movable_blocks),
            )
            for p in self._placements.values()
            if p.home in known and set(p.tokens_by_instance) <= known
        ]
        return views, requests

    def plan_migrations(self, perf: PerfModel, config: RebalancerConfig) -> list[MigrationOrder]:
        views, requests = self.cluster_view(config.block_size)
        if len(views) < 2:
            return []
        return [
            MigrationOrder(m.request_id, m.src, m.dst, m.num_blocks)
            for m in plan_migrations(views, requests, perf, config)
        ]

    def _check_instance(self, instance_id: int) -> None:
        if instance_id not in self._status:
            raise ValueError(f"instance id {instance_id!r} is not a member (members: {self.members})")
