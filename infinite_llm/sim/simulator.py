"""Discrete-event cluster simulator on the real control plane (pure Python, no torch).

Every instance is an engine of its own (`SimInstance`: the real `RManager`, `HomeKV`,
`Scheduler` and `HomeMigrations`, stepped in `InstanceEngine.step`'s order) with its own clock:
the time its loop is free. Nothing steps the cluster as a whole. Events, in time order:

- arrival: the router's rule (`control/dispatch.py`, shared with `cluster/router.py`) picks a home on the view the
  gManager last sent it (where the prompt fits the free blocks its waiting requests leave, then the
  least prompt work queued, then the most such blocks; counting what it dispatched that the
  instances' reports do not include yet); the request reaches the home after a link latency.
  A request no instance could ever hold is refused at the front end, as `LLMEngine` does;
- instance step: finish the step in flight (scheduler update), then begin the next one (inbound
  requests and orders, commit copies, schedule, issue copies) and price it (`pricing.py`). The
  guest MicroAttention it causes on each holder is charged to that holder's timeline: a busy
  holder's step ends later by that much, an idle one serves it in its idle time. A home waits
  only for its own holders, so a slow instance delays only the requests with blocks there;
- heartbeat tick (every `heartbeat_interval_s`): each instance whose state changed reports to
  the real `GManager`, which sees it after a latency (its view lags);
- rebalance tick (every `rebalance_interval_s`, `infinite` only): the gManager plans migrations
  on its view; orders reach the homes after a latency;
- copy completion: a block copy takes block bytes / bandwidth on the source's link (copies from
  one source queue) plus latency; the home commits it at its next step.

Borrowing is a round trip to the gManager (who may lend) and one per creditor asked (2 x
latency each, added to the home's step); grants come from the creditor's real rManager.
`static`, `striped` and `infinite` run the very same code; only the placement policy differs.
Every number is deterministic for a given trace and setup.

Simplified: prompt token ids are all `token_id` (cost does not depend on values); per-layer
waits are summed over the step (max over holders, overlapped with local attention) instead of
interleaved layer by layer; guest attention runs at once on the holder, not at its next
attention point; the control plane's own CPU time is not charged (on a GPU cluster it overlaps
the device; for threads sharing a host, `StepCostModel.step_overhead_s` stands for it).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.gmanager import GManager
from infinite_llm.control.home_kv import PLACEMENT_POLICIES
from infinite_llm.control.messages import AddRequest, Heartbeat, MigrationOrder
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rebalancer import RebalancerConfig
from infinite_llm.control.request import Request
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError
from infinite_llm.sim.cluster import SimClusterSpec, StepCostModel
from infinite_llm.sim.instance import InstanceSpec, SimInstance
from infinite_llm.sim.requests import RequestRecord, make_request
from infinite_llm.sim.results import SimResult, mean
from infinite_llm.control.dispatch import Dispatcher


class SimulationStalledError(RuntimeError):
    """Requests are unfinished but no instance has made progress for a long simulated time."""


@dataclass
class SimSetup:
    """Everything one simulated run needs besides the trace."""

    cost: StepCostModel
    num_instances: int
    num_blocks_per_instance: int
    block_size: int
    placement: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # per instance
    lend_fraction: float = 0.9
    heartbeat_interval_s: float = 0.1
    rebalance_interval_s: float = 0.5
    view_interval_s: float = 0.05  # the gManager's view to the router
    migration_tokens_per_step: int = 1024
    # The model the rebalancer plans with; None: the cost model's PerfModel.
    rebalancer_perf: Optional[PerfModel] = None
    # Rebalancer knobs; None: defaults, with the copy cost of a block over the network.
    rebalancer: Optional[RebalancerConfig] = None
    # Test hook: instance -> speed factor of its compute (0.25: four times slower).
    speed: dict[int, float] = field(default_factory=dict)
    # An instance with work but nothing schedulable (waiting for memory or copies) retries
    # after this long, as the engine's loop polls.
    idle_poll_s: float = 0.01
    token_id: int = 0
    # Give up when no instance made progress for this long (simulated seconds).
    stall_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENT_POLICIES}")
        for name in ("num_instances", "num_blocks_per_instance", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SimSetup.{name} must be an integer >= 1, got {value!r}")
        for name in ("heartbeat_interval_s", "rebalance_interval_s", "view_interval_s", "idle_poll_s",
                     "stall_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"SimSetup.{name} must be finite and > 0, got {getattr(self, name)!r}")
        if self.migration_tokens_per_step < 0:
            raise ValueError(f"SimSetup.migration_tokens_per_step must be >= 0, got {self.migration_tokens_per_step}")
        for instance, factor in self.speed.items():
            if not 0 <= instance < self.num_instances or not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"SimSetup.speed: instance {instance} factor {factor} is out of range")

    @classmethod
    def for_cluster(cls, spec: SimClusterSpec, placement: str, scheduler: SchedulerConfig,
                    **overrides: Any) -> SimSetup:
        return cls(cost=spec.cost_model(), num_instances=spec.num_instances,
                   num_blocks_per_instance=spec.blocks_per_instance, block_size=spec.block_size,
                   placement=placement, scheduler=scheduler, lend_fraction=spec.lend_fraction, **overrides)

    def rebalancer_config(self) -> RebalancerConfig:
        if self.rebalancer is not None:
            return self.rebalancer
        copy_s = self.block_size * self.cost.kv_bytes_per_token / self.cost.inter_node_bandwidth_Bps
        return RebalancerConfig(block_size=self.block_size, copy_s_per_block=copy_s,
                                horizon_s=self.rebalance_interval_s)


class Simulator:
    """One cluster, one placement policy; `run(trace)` once."""

    def __init__(self, setup: SimSetup) -> None:
        self.setup = setup
        self.cost = setup.cost
        n = setup.num_instances
        self.gmanager = GManager(n, heartbeat_timeout_s=math.inf)  # no failures are simulated
        spec = InstanceSpec(n, setup.num_blocks_per_instance, setup.block_size, setup.placement,
                            setup.scheduler, setup.lend_fraction, setup.migration_tokens_per_step, setup.token_id)
        self.instances = [SimInstance(i, spec, self, self._pool_state, self._room) for i in range(n)]
        self.rmanagers = [inst.rm for inst in self.instances]
        self.router = Dispatcher(n, setup.block_size, setup.scheduler.max_num_batched_tokens)
        self._perf = setup.rebalancer_perf or setup.cost.perf
        self._rebalancer = setup.rebalancer_config()
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self._pending: list[Optional[tuple[float, int]]] = [None] * n  # instance -> (time, seq) of its step event
        self._dirty: set[int] = set(range(n))
        self._link_free = [0.0] * n  # when each instance's outgoing copy link is free
        self._view_changed = True  # since the last migration plan
        self._router_stale = False  # since the last view sent to the router
        self._orders: list[MigrationOrder] = []
        self.records: dict[str, RequestRecord] = {}
        self._unresolved = 0
        self._last_progress = 0.0
        self.now = 0.0
        self.migrated_bytes = 0
        self._heartbeats_received = 0
        self._current_seq = -1  # the event being handled
        self._ran = False

    # ------------------------------------------------------------------ World
    def gmanager_latency(self, instance: int) -> float:
        """The gManager and the router run off the instances' nodes: their (small, control)
        messages cross the network."""
        latency = self.cost.control_latency_s
        return self.cost.inter_node_latency_s if latency is None else latency

    def _pool_state(self) -> tuple:
        """What decides whether an allocation succeeds: every pool's free and lent counts and the
        gManager's view (which creditors it names)."""
        return (self._heartbeats_received, tuple([(rm.num_free, rm.num_lent) for rm in self.rmanagers]))

    def _room(self, home: int) -> int:
        """The most blocks an allocation of `home` could get now: its own free blocks and what
        every other instance could lend (none under static)."""
        room = self.rmanagers[home].num_free
        if self.setup.placement != "static":
            room += sum(rm.lendable for rm in self.rmanagers if rm.instance_id != home)
        return room

    def touched(self, instance: int) -> None:
        self._dirty.add(instance)

    def start_copy(self, home: int, tag: int, request_id: str, src: BlockRef, dst: BlockRef, now: float) -> None:
        cost = self.cost
        ask = 0.0 if src.instance == home else cost.latency(home, src.instance)
        size = self.setup.block_size * cost.kv_bytes_per_token
        start = max(now + ask, self._link_free[src.instance])
        self._link_free[src.instance] = start + size / cost.bandwidth(src.instance, dst.instance)
        landed = self._link_free[src.instance] + cost.latency(src.instance, dst.instance)
        self.migrated_bytes += size
        self._at(landed + cost.latency(dst.instance, home), self._copy_done, home, tag, request_id, src, dst)

    # ------------------------------------------------------------------ events
    def _at(self, when: float, handler: Callable[..., None], *args: Any) -> int:
        seq = next(self._seq)
        heapq.heappush(self._events, (when, seq, handler, args))
        return seq

    def _schedule_step(self, i: int, when: float) -> None:
        self._pending[i] = (when, self._at(when, self._step, i))

    def _wake(self, i: int) -> None:
        if self._pending[i] is None:
            self._schedule_step(i, max(self.now, self.instances[i].free_at))

    def _arrival(self, item: TraceRequest) -> None:
        record = self.records[item.request_id]
        request = make_request(item, self.setup.token_id)
        capacity = self.instances[0].scheduler.max_context()
        if item.prompt_len + item.output_len > capacity:
            self._reject(record, RequestTooLongError.__name__)
            return
        home = self.router.dispatch(request)
        request.home = record.home = home
        self._at(self.now + self.gmanager_latency(home), self._deliver, home, AddRequest(request))

    def _deliver(self, i: int, message: Any) -> None:
        inst = self.instances[i]
        inst.inbound.append(message)
        if isinstance(message, AddRequest) and (free_at := inst.call_off(self.now, self.cost.num_layers)) is not None:
            self._schedule_step(i, free_at)  # the step's own end event is now stale
        self._wake(i)

    def _admit(self, inst: SimInstance, request: Request) -> None:
        try:
            inst.scheduler.add_request(request)
        except (RequestTooLongError, QueueFullError) as exc:
            self._reject(self.records[request.request_id], type(exc).__name__)

    def _reject(self, record: RequestRecord, reason: str) -> None:
        record.rejected = reason
        record.output_len = 0
        self._unresolved -= 1

    def _step(self, i: int) -> None:
        pending = self._pending[i]
        if pending is None or pending[1] != self._current_seq:
            return  # superseded: the step was pushed back by guest work
        self._pending[i] = None
        inst = self.instances[i]
        if inst.in_flight is not None:
            self._finished(inst.finish_step(self.now))
        step = inst.begin_step(self.now, self.cost, self._speed, self._admit)
        self._dirty.add(i)
        for dst, message in inst.outbox:
            self._at(self.now + self.cost.control_latency(i, dst), self._deliver, dst, message)
        inst.outbox.clear()
        if step is None:
            if inst.has_work():
                self._schedule_step(i, self.now + self.setup.idle_poll_s)
            return
        self._last_progress = self.now
        stretch = self._host_stretch(i)
        duration = step.price.duration_s * stretch
        step.duration_s = duration
        step.executed_s = (step.price.duration_s - step.price.round_trip_s) * stretch
        for holder in step.price.holders:
            self._charge_guest(holder.holder, self.now + self.cost.latency(i, holder.holder), holder.compute_s)
        inst.free_at = self.now + duration
        self._schedule_step(i, inst.free_at)

    def _charge_guest(self, h: int, arrives: float, compute_s: float) -> None:
        """A holder serves a guest's MicroAttention: its loop is free that much later."""
        inst = self.instances[h]
        inst.free_at = max(inst.free_at, arrives) + compute_s
        inst.stats.guest_s += compute_s
        inst.stats.guest_queries += self.cost.num_layers
        pending = self._pending[h]
        if pending is not None and pending[0] < inst.free_at:
            self._schedule_step(h, inst.free_at)  # the old event is now stale

    def _host_stretch(self, i: int) -> float:
        """Instances sharing a host's cores (threads of the local engine) slow each other."""
        if self.cost.host_stretch is None:
            return 1.0
        busy = 1 + sum(1 for j, inst in enumerate(self.instances) if j != i and inst.in_flight is not None)
        return self.cost.stretch(busy)

    def _speed(self, i: int) -> float:
        return self.setup.speed.get(i, 1.0)

    def _finished(self, requests: list[Request]) -> None:
        for request in requests:
            record = self.records[request.request_id]
            record.first_token_s = request.first_token_time
            record.finished_s = request.finished_time
            record.output_len = len(request.output_token_ids)
            record.num_preemptions = request.num_preemptions
            self._unresolved -= 1

    def _copy_done(self, home: int, tag: int, request_id: str, src: BlockRef, dst: BlockRef) -> None:
        # The source sends nothing for a block it no longer holds; the target never writes a
        # block that is not reserved for the request any more (InstanceEngine._on_block_data).
        ok = self.rmanagers[src.instance].holds(request_id, src.block) and \
            self.rmanagers[dst.instance].holds(request_id, dst.block)
        self.instances[home].migrations.copy_done(tag, ok)
        self._wake(home)

    # ------------------------------------------------------------------ gManager
    def _view_tick(self) -> None:
        """GManagerService sends the router its view on a period (when it changed, here)."""
        if self._router_stale:
            statuses = {i: s.status() for i in range(self.setup.num_instances)
                        if (s := self.gmanager.status(i)) is not None}
            self._at(self.now + self.gmanager_latency(0), self.router.update_view, statuses)
            self._router_stale = False
        if self._unresolved:
            self._at(self.now + self.setup.view_interval_s, self._view_tick)

    def _heartbeat_tick(self) -> None:
        for i in sorted(self._dirty):
            beat = self.instances[i].heartbeat(self.now)
            if beat is not None:
                self._at(self.now + self.gmanager_latency(i), self._gm_receive, beat)
        self._dirty.clear()
        if self._unresolved:
            self._at(self.now + self.setup.heartbeat_interval_s, self._heartbeat_tick)

    def _gm_receive(self, beat: Heartbeat) -> None:
        self.gmanager.heartbeat(beat, self.now)
        self._heartbeats_received += 1
        self._view_changed = self._router_stale = True

    def _rebalance_tick(self) -> None:
        # Like GManagerService: plan every interval and send the orders. An unchanged view gives
        # the same plan, so it is reused rather than recomputed.
        if self._view_changed:
            self._orders = self.gmanager.plan_migrations(self._perf, self._rebalancer)
            self._view_changed = False
        for order in self._orders:
            home = self.gmanager.home_of(order.request_id)
            if home is not None:
                self._at(self.now + self.gmanager_latency(home), self._deliver, home, order)
        if self._unresolved:
            self._at(self.now + self.setup.rebalance_interval_s, self._rebalance_tick)

    def order_migration(self, at_s: float, order: MigrationOrder) -> None:
        """Hand `order` to its request's home at simulated time `at_s`, as if the gManager had
        sent it (tests and experiments; call before `run`)."""
        def send() -> None:
            record = self.records.get(order.request_id)
            if record is not None and record.home is not None:
                self._deliver(record.home, order)

        self._at(at_s, send)

    # ------------------------------------------------------------------ run
    def run(self, trace: Sequence[TraceRequest]) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulator runs one trace; build a new one for another run")
        self._ran = True
        if not trace:
            raise ValueError("the trace is empty: nothing to simulate")
        if len({r.request_id for r in trace}) != len(trace):
            raise ValueError("the trace has duplicate request ids")
        started = time.perf_counter()
        ordered = sorted(trace, key=lambda r: (r.arrival_time_s, r.request_id))
        first = ordered[0].arrival_time_s
        self.now = self._last_progress = first
        for item in ordered:
            self.records[item.request_id] = RequestRecord(item.request_id, item.arrival_time_s, item.prompt_len,
                                                          item.output_len)
            self._at(item.arrival_time_s, self._arrival, item)
        self._unresolved = len(ordered)
        self._ready(first)
        self._at(first, self._heartbeat_tick)
        self._at(first, self._view_tick)
        if self.setup.placement == "infinite" and self.setup.num_instances > 1:
            self._at(first + self.setup.rebalance_interval_s, self._rebalance_tick)
        self._loop()
        return self._result(trace, first, time.perf_counter() - started)

    def _ready(self, now: float) -> None:
        """The front end waits until the gManager has heard from every instance and the router
        has its view (`Router.wait_ready`), so the first arrivals are placed on a full view."""
        for inst in self.instances:
            beat = inst.heartbeat(now)
            assert beat is not None
            self.gmanager.heartbeat(beat, now)
        self.router.update_view({i: s.status() for i in range(self.setup.num_instances)
                                 if (s := self.gmanager.status(i)) is not None})

    def _loop(self) -> None:
        events = self._events
        while events and self._unresolved:
            when, seq, handler, args = heapq.heappop(events)
            self.now = when
            self._current_seq = seq
            handler(*args)
            if when - self._last_progress > self.setup.stall_timeout_s:
                raise SimulationStalledError(
                    f"policy {self.setup.placement!r}: no progress for {self.setup.stall_timeout_s:.0f} s "
                    f"of simulated time; {self._unresolved} requests unfinished"
                )

    def _result(self, trace: Sequence[TraceRequest], first: float, wall_s: float) -> SimResult:
        return build_result(self, trace, first, wall_s)



def build_result(sim: Simulator, trace: Sequence[TraceRequest], first: float, wall_s: float) -> SimResult:
    records = [sim.records[r.request_id] for r in trace]
    done = [r for r in records if r.completed]
    last = max((r.finished_s for r in done), default=first)  # type: ignore[type-var]
    makespan = last - first
    stats = [inst.stats for inst in sim.instances]
    for inst in sim.instances:
        inst._sample_memory(last)  # close the memory integral at the end of the run
    reasons: dict[str, int] = {}
    for r in records:
        if r.rejected is not None:
            reasons[r.rejected] = reasons.get(r.rejected, 0) + 1
    blocks = sim.setup.num_blocks_per_instance
    links = [inst.link for inst in sim.instances]
    return SimResult(
        policy=sim.setup.placement, num_instances=sim.setup.num_instances, blocks_per_instance=blocks,
        block_size=sim.setup.block_size, num_requests=len(records), num_completed=len(done),
        num_rejected=sum(1 for r in records if r.rejected is not None), rejection_reasons=reasons,
        prompt_tokens=sum(r.prompt_len for r in done), generated_tokens=sum(r.output_len for r in done),
        makespan_s=makespan, busy_time_s=sum(s.compute_s + s.guest_s for s in stats),
        num_steps=sum(s.num_steps for s in stats), num_preemptions=sum(r.num_preemptions for r in done),
        max_context_served=max((r.tokens for r in done), default=0),
        max_context_capacity=sim.instances[0].scheduler.max_context(),
        mem_util_per_instance=[s.used_block_s / (blocks * makespan) if makespan > 0 else 0.0 for s in stats],
        migrated_blocks=sum(inst.migrations.num_migrated_blocks for inst in sim.instances),
        migrated_bytes=sim.migrated_bytes, attention_bytes=sum(s.attention_bytes for s in stats),
        decode_steps=sum(s.decode_steps for s in stats), decode_bytes=sum(s.decode_bytes for s in stats),
        decode_exchanges=sum(s.decode_exchanges for s in stats),
        num_borrows=sum(link.num_borrows for link in links), num_refusals=sum(link.num_refusals for link in links),
        mean_ttft_s=mean([r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None]),
        mean_latency_s=mean([r.finished_s - r.arrival_s for r in done]),  # type: ignore[operator]
        time_split_s={
            "non_attention": sum(s.non_attention_s for s in stats),
            "attention": sum(s.attention_s for s in stats),
            "holder_wait": sum(s.wait_s for s in stats),
            "round_trips": sum(s.round_trip_s for s in stats),
            "guest_attention": sum(s.guest_s for s in stats),
        },
        wall_time_s=wall_s, records=records,
    )


def simulate(setup: SimSetup, trace: Sequence[TraceRequest]) -> SimResult:
    """Run `trace` through a fresh simulated cluster."""
    return Simulator(setup).run(trace)


__all__ = ["SimResult", "SimSetup", "SimulationStalledError", "Simulator", "simulate"]
