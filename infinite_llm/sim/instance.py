"""One simulated instance: the real control state of an instance engine, stepped by events.

It owns what `instance/engine.py`'s `InstanceEngine` owns (an `RManager`, a `HomeKV`, a
`Scheduler`, `HomeMigrations`) and steps in the same order: apply inbound requests and
migration orders; commit confirmed block copies; cap running prompts' chunks (`PrefillPacer`,
fed the priced step times); schedule; issue this step's copies; execute (here: price); update. A step is split in two events, begin (everything up to execute, at the
time the loop is free) and finish (update, when the priced duration has passed), so other
instances see its blocks taken while it runs and its tokens only when it is done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Union

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.home_kv import lend_cap_for
from infinite_llm.control.messages import (
    AddRequest,
    AdmissionHold,
    Heartbeat,
    MigrationOrder,
    ReclaimBlocks,
    RequestPlacement,
)
from infinite_llm.control.migration import HomeMigrations
from infinite_llm.control.pacer import PrefillPacer
from infinite_llm.control.plan import SampleResult, SeqWork
from infinite_llm.control.request import Request
from infinite_llm.control.rmanager import RManager
from infinite_llm.control.scheduler import Scheduler, SchedulerOutput
from infinite_llm.sim.cluster import StepCostModel
from infinite_llm.sim.layout import KVLayout
from infinite_llm.sim.links import HomeLink, World
from infinite_llm.sim.memo_kv import MemoHomeKV
from infinite_llm.sim.pricing import StepPrice, price_step

Inbound = Union[AddRequest, MigrationOrder, ReclaimBlocks, AdmissionHold]


@dataclass(frozen=True)
class InstanceSpec:
    """What every simulated instance is configured with."""

    num_instances: int
    num_blocks: int
    block_size: int
    placement: str
    scheduler: SchedulerConfig
    lend_fraction: float
    migration_tokens_per_step: int
    token_id: int = 0


@dataclass
class StepInFlight:
    out: SchedulerOutput
    price: StepPrice
    started_s: float
    duration_s: float = 0.0  # on this host (stretched), holders' waits included
    executed_s: float = 0.0  # what the engine's pacer measures of it


@dataclass
class InstanceStats:
    num_steps: int = 0
    compute_s: float = 0.0  # own steps' work (non-attention, local attention)
    guest_s: float = 0.0  # MicroAttention served for other homes' requests
    guest_queries: int = 0  # attention messages served for other homes (one per layer and home step)
    num_called_off: int = 0  # steps of prompts alone called off for a newcomer (their work is lost)
    wait_s: float = 0.0  # time steps spent waiting on holders beyond local attention
    round_trip_s: float = 0.0  # waiting for gManager / creditor replies (borrowing)
    non_attention_s: float = 0.0
    attention_s: float = 0.0
    attention_bytes: int = 0
    used_block_s: float = 0.0  # integral of used blocks over time
    last_sample_s: float = 0.0
    decode_steps: int = 0  # steps of decodes only (one token per request)
    decode_bytes: int = 0  # attention bytes those steps sent and received
    decode_exchanges: int = 0  # (step, holder) pairs of those steps


class SimInstance:
    def __init__(self, rank: int, spec: InstanceSpec, world: World, pool_state: Callable[[], tuple],
                 room: Callable[[int], int], max_context: Optional[int] = None) -> None:
        self.rank = rank
        self.spec = spec
        self.lend_cap = lend_cap_for(spec.placement, spec.num_blocks, spec.lend_fraction)
        self.rm = RManager(rank, spec.num_blocks, self.lend_cap)
        self.link = HomeLink(rank, world)
        self.kv = MemoHomeKV(self.rm, spec.block_size, spec.placement, spec.num_instances, self.link, pool_state, room,
                             headroom_fraction=spec.scheduler.headroom_fraction)
        capacity = self.kv.max_tokens_per_request(spec.num_blocks, self.lend_cap)
        self.scheduler = Scheduler(spec.scheduler, self.kv, min(capacity, max_context or capacity))
        self.migrations = HomeMigrations(self.kv, spec.migration_tokens_per_step, self.link)
        sched = spec.scheduler
        self.pacer = PrefillPacer(sched.max_num_batched_tokens, sched.prefill_slowdown, sched.lone_prefill_slowdown)
        self.layout = KVLayout(self.kv)
        self.inbound: deque[Inbound] = deque()
        self.outbox: list[tuple[int, Union[ReclaimBlocks, AdmissionHold]]] = []  # to other instances, sent by the simulator
        self.in_flight: Optional[StepInFlight] = None
        self.free_at = 0.0  # when the loop is free: the end of the step or guest work in progress
        self.stats = InstanceStats()
        self._beat_seq = 0
        self._sent_state: Optional[tuple] = None
        self._sent_placements: dict[str, tuple[tuple, RequestPlacement]] = {}

    # ------------------------------------------------------------------ step
    def has_work(self) -> bool:
        return bool(self.inbound or self.scheduler.has_unfinished() or self.migrations.busy())

    def begin_step(self, now: float, cost: StepCostModel, speed: Callable[[int], float],
                   admit: Callable[[SimInstance, Request], None]) -> Optional[StepInFlight]:
        """Everything of `InstanceEngine.step` up to execute; None if there is no batch."""
        self._sample_memory(now)
        self.link.now = now
        while self.inbound:
            item = self.inbound.popleft()
            if isinstance(item, AddRequest):
                admit(self, item.request)
            elif isinstance(item, ReclaimBlocks):
                self._give_back(item.request_id)
            elif isinstance(item, AdmissionHold):
                self.scheduler.set_peer_hold(item.home, item.request_id, item.on)
            else:
                self.migrations.add_order(item)
        self.migrations.commit({r.request_id: r for r in self.scheduler.running})
        self._pace_prefill()
        out = self.scheduler.schedule()
        self.outbox.extend((borrower, ReclaimBlocks(self.rank, rid)) for borrower, rid in self.scheduler.take_reclaims())
        peers = [i for i in range(self.spec.num_instances) if i != self.rank]
        self.outbox.extend((peer, AdmissionHold(self.rank, rid, on)) for rid, on in self.scheduler.take_holds() for peer in peers)
        self.migrations.issue({r.request_id: r for r in self.scheduler.running})
        for request in out.preempted:
            self.layout.forget(request.request_id)
        if not out.batch:
            self.stats.round_trip_s += self.link.take_delay()
            return None
        price = price_step(cost, self.rank, out.batch, self._tokens_of, speed)
        price.round_trip_s = self.link.take_delay()  # the loop waited for grants before executing
        self.in_flight = StepInFlight(out, price, now)
        self._account(price)
        return self.in_flight

    def _give_back(self, request_id: str) -> None:
        """A creditor reclaims its blocks: the request is recomputed later (preempted)."""
        if self.scheduler.reclaim(request_id) is not None:
            self.migrations.forget(request_id)
            self.layout.forget(request_id)

    def call_off(self, now: float, layers: int) -> Optional[float]:
        """As InstanceEngine: a request arrived; a step of prompts alone is called off at its
        next check (before and after each layer's attention: every half layer, here) if the rest
        would make the newcomer wait too long (PrefillPacer.interrupts). Returns when the loop is
        free again, or None if the step goes on. Nothing of the step is committed; holders were
        charged for all of it (rare: a spanning prompt alone is paced to short steps)."""
        step = self.in_flight
        if step is None or step.out.num_decodes or step.duration_s <= 0.0:
            return None
        checks = 2 * layers
        check_s = step.duration_s / checks
        done = int((now - step.started_s) / check_s) + 1  # half layers finished at the next check
        if done >= checks or not self.pacer.interrupts(done * check_s, done / checks):
            return None
        self.in_flight = None
        self.stats.num_called_off += 1
        guest_work_after = max(0.0, self.free_at - (step.started_s + step.duration_s))
        self.free_at = step.started_s + done * check_s + guest_work_after
        return self.free_at

    def _pace_prefill(self) -> None:
        """The engine caps running prompts' chunks from measured step times (PrefillPacer)."""
        self.scheduler.pace_prefill(self.pacer)

    def finish_step(self, now: float) -> list[Request]:
        """Apply the in-flight step's results; returns the requests it finished."""
        step = self.in_flight
        assert step is not None
        self.in_flight = None
        self.pacer.observe(step.executed_s, step.out.num_prefill_tokens, step.out.num_decodes)
        token = self.spec.token_id
        results = [SampleResult(w.request_id, token) for w in step.out.batch if w.sample]
        finished = [r for r in self.scheduler.update(step.out, results, now) if r.is_finished]
        for request in finished:
            self.migrations.forget(request.request_id)
            self.layout.forget(request.request_id)
            self.scheduler.pop_finished(request.request_id)
        return finished

    def _tokens_of(self, work: SeqWork) -> tuple[dict[int, int], dict[int, int]]:
        request = self.scheduler.requests[work.request_id]
        version = (self.migrations.num_migrated_blocks, request.num_preemptions)
        visible = self.layout.tokens_below(work.request_id, work.end_pos, version)
        if len(visible) == 1:
            return visible, {}  # all of it on one instance: nothing is written elsewhere
        before = self.layout.tokens_below(work.request_id, work.start_pos, version)
        writes = {i: n - before.get(i, 0) for i, n in visible.items() if n > before.get(i, 0)}
        return visible, writes

    def _account(self, price: StepPrice) -> None:
        stats = self.stats
        stats.num_steps += 1
        stats.compute_s += price.compute_s
        stats.non_attention_s += price.non_attention_s
        stats.attention_s += price.attention_s
        stats.wait_s += max(0.0, price.remote_wait_s - price.attention_s)
        stats.round_trip_s += price.round_trip_s
        stats.attention_bytes += price.bytes_sent
        if price.num_tokens == price.num_seqs:  # a pure decode step
            stats.decode_steps += 1
            stats.decode_bytes += price.bytes_sent
            stats.decode_exchanges += len(price.holders)

    def _sample_memory(self, now: float) -> None:
        """Integrate used blocks over time (piecewise constant between this instance's events)."""
        stats = self.stats
        stats.used_block_s += self.rm.pool.num_used * max(0.0, now - stats.last_sample_s)
        stats.last_sample_s = now

    # ------------------------------------------------------------------ heartbeat
    def heartbeat(self, now: float) -> Optional[Heartbeat]:
        """What `InstanceEngine.heartbeat` would send now; None when nothing changed since the
        last one (the gManager's view would be the same, so the simulator skips it)."""
        placements, removed = self._placement_changes()
        load = self.scheduler.load()
        # The engine's heartbeat also carries its cumulative counters.
        load.num_steps = self.stats.num_steps
        load.num_preemptions = self.scheduler.num_preemptions
        load.num_migrated_blocks = self.migrations.num_migrated_blocks
        load.num_guest_queries = self.stats.guest_queries
        rm = self.rm
        state = (rm.num_free, rm.num_lent, rm.num_borrowed, rm.lendable, load)
        if state == self._sent_state and not placements and not removed:
            return None
        self._sent_state = state
        self._beat_seq += 1
        return Heartbeat(
            instance=self.rank, seq=self._beat_seq, sent_time=now, num_blocks=rm.pool.num_blocks,
            num_free=rm.num_free, num_lent=rm.num_lent, num_borrowed=rm.num_borrowed, lendable=rm.lendable,
            load=load, placements=placements, removed=removed,
        )

    def _placement_changes(self) -> tuple[list[RequestPlacement], list[str]]:
        bs = self.spec.block_size
        current: dict[str, tuple[tuple, RequestPlacement]] = {}
        changed = []
        for r in self.scheduler.running:
            table = self.kv.block_table(r.request_id)
            if not table:
                continue
            # What placement_of depends on; recomputed only when it moved.
            key = (len(table), r.num_computed_tokens // bs, self.migrations.num_migrated_blocks, r.num_preemptions)
            sent = self._sent_placements.get(r.request_id)
            if sent is not None and sent[0] == key:
                current[r.request_id] = sent
                continue
            placement = self.kv.placement_of(r.request_id, r.num_computed_tokens)
            current[r.request_id] = (key, placement)
            if sent is None or sent[1] != placement:
                changed.append(placement)
        removed = [rid for rid in self._sent_placements if rid not in current]
        self._sent_placements = current
        return changed, removed


__all__ = ["InstanceSpec", "InstanceStats", "SimInstance", "StepInFlight"]
