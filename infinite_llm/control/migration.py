"""Turns the rebalancer's migration orders into bounded, reserve-first block moves (pure Python).

Every `rebalance_interval_steps` steps (infinite policy only) the coordinator builds the
gManager's view of the cluster, asks the greedy rebalancer for migration orders, and queues them.
A block moves in two phases, so that its copy overlaps a step's compute instead of delaying it:
- issue (`issue_copies`, after the step is scheduled): at most the rate limit's worth of full
  blocks (every slot computed, hence immutable) get a block reserved on the target first (a failed
  reservation drops the order until the next rebalancing round) and a `BlockMove` in the plan.
  The instances copy them in the background while they compute the step; the request's block
  table still points at the source, which nobody writes.
- commit (`commit_copies`, before the next step is scheduled): the table switches to the copy and
  the source is released. Each instance waits for its outstanding copies before it executes the
  next plan, so neither the copy nor a reused source block can be touched early. A copy whose
  request finished, was aborted or preempted meanwhile is dropped (its reservation went with the
  request's other blocks).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from infinite_llm.config import ClusterConfig, EngineConfig, ModelConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.plan import BlockMove, BlockRef
from infinite_llm.control.rebalancer import (
    InstanceView,
    Migration,
    MigrationRateLimiter,
    RebalancerConfig,
    RequestKV,
    plan_migrations,
)

if TYPE_CHECKING:
    from infinite_llm.control.scheduler import Scheduler, SchedulerOutput


@dataclass(frozen=True)
class _Copy:
    """A block copy issued this step, committed at the next."""

    request_id: str
    index: int  # position in the request's block table
    src: BlockRef
    dst: BlockRef


@dataclass
class _Order:
    request_id: str
    src: int
    dst: int
    blocks_left: int


def default_perf_model(model_config: Optional[ModelConfig]) -> PerfModel:
    """A rough CPU model used until a profile is loaded: weight reads dominate non-attention time,
    attention costs grow with KV read. Only the ratios matter to the rebalancer's decisions."""
    params = model_config.num_parameters() if model_config else 3_000_000
    kv_per_token = model_config.kv_bytes_per_token() if model_config else 16_384
    bandwidth = 10e9  # bytes/s, order of a CPU's memory bandwidth
    return PerfModel(
        t_fixed=4 * params / bandwidth,
        t_per_token=2 * params / 50e9,
        t_per_seq=20e-6,
        t_per_kv_token=kv_per_token / bandwidth,
    )


class MigrationCoordinator:
    def __init__(self, kv: ClusterKVManager, perf: PerfModel, interval_steps: int,
                 tokens_per_step: int, enabled: Optional[bool] = None):
        self.kv = kv
        self.perf = perf
        self.interval_steps = max(1, interval_steps)
        # Only the infinite policy rebalances, and only when there is somewhere to move to.
        self.enabled = (kv.placement == "infinite" and kv.num_instances > 1) if enabled is None else enabled
        self.limiter = MigrationRateLimiter(tokens_per_step, kv.block_size)
        self.rebalancer_config = RebalancerConfig(block_size=kv.block_size)
        self.orders: list[_Order] = []
        self.in_flight: list[_Copy] = []
        self.num_migrated_blocks = 0  # committed copies
        self.num_dropped_copies = 0  # issued, but the request was gone by the commit
        self.num_failed_reservations = 0

    @classmethod
    def for_engine(cls, config: EngineConfig, kv: ClusterKVManager, model_config: Optional[ModelConfig]) -> "MigrationCoordinator":
        cluster: ClusterConfig = config.cluster
        perf_path = getattr(cluster, "perf_model_path", None)
        perf = PerfModel.load(perf_path) if perf_path else default_perf_model(model_config)
        return cls(
            kv, perf, cluster.rebalance_interval_steps, cluster.migration_tokens_per_step,
        )

    # --------------------------------------------------------------- planning
    def cluster_view(self, scheduler: "Scheduler") -> tuple[list[InstanceView], list[RequestKV]]:
        bs = self.kv.block_size
        load = scheduler.home_load()
        requests: list[RequestKV] = []
        for r in scheduler.running:
            if r.home is None:
                continue
            table = self.kv.block_table(r.request_id)
            by_instance: dict[int, int] = {}
            for ref in table:
                by_instance[ref.instance] = by_instance.get(ref.instance, 0) + bs
            full = r.num_computed_tokens // bs
            requests.append(
                RequestKV(
                    request_id=r.request_id,
                    home=r.home,
                    tokens_by_instance=by_instance,
                    num_full_blocks_at_home=sum(1 for ref in table[:full] if ref.instance == r.home),
                )
            )
        waiting_count, waiting_tokens = self._waiting_by_instance(scheduler)
        views = []
        for i, rm in enumerate(self.kv.rmanagers):
            batch, tokens = load.get(i, (0, 0))
            # The size of a request this instance would admit: those waiting for it, else the
            # ones it runs (a single long request there says little about the next one).
            if waiting_count[i]:
                avg = waiting_tokens[i] / waiting_count[i]
            else:
                avg = tokens / batch if batch else 0.0
            views.append(
                InstanceView(
                    instance_id=i,
                    num_blocks=rm.pool.num_blocks,
                    num_free=rm.num_free,
                    lendable=rm.lendable,
                    batch_size=batch,
                    num_waiting_for_memory=waiting_count[i],
                    avg_request_tokens=avg,
                )
            )
        return views, requests

    def _waiting_by_instance(self, scheduler: "Scheduler") -> tuple[list[int], list[int]]:
        """Waiting requests (and their tokens) per instance. A preempted request waits for its
        home; one never dispatched goes where least-loaded dispatch would send it now (the most
        free blocks, less what the requests placed before it in this estimate would take)."""
        bs = self.kv.block_size
        count = [0] * self.kv.num_instances
        tokens = [0] * self.kv.num_instances
        free = [(-rm.num_free, i) for i, rm in enumerate(self.kv.rmanagers)]
        heapq.heapify(free)
        for r in scheduler.waiting:
            if r.home is not None:
                target = r.home
            else:
                neg_free, target = heapq.heappop(free)
                heapq.heappush(free, (neg_free + -(-r.num_tokens // bs), target))
            count[target] += 1
            tokens[target] += r.num_tokens
        return count, tokens

    def commit_copies(self, scheduler: "Scheduler") -> int:
        """Point block tables at last step's copies and release the sources (call before
        scheduling, so the step's plan reads the copies). Returns the number committed."""
        copies, self.in_flight = self.in_flight, []
        running = {r.request_id for r in scheduler.running}
        committed = 0
        for copy in copies:
            if copy.request_id not in running or copy.dst not in self.kv.reservations(copy.request_id):
                self.num_dropped_copies += 1
                continue
            table = self.kv.block_table(copy.request_id)
            if table[copy.index] != copy.src:  # cannot happen while the request keeps running
                raise RuntimeError(f"block table of {copy.request_id!r} changed under an in-flight copy")
            self.kv.replace_block(copy.request_id, copy.index, copy.dst)
            committed += 1
        self.num_migrated_blocks += committed
        return committed

    def issue_copies(self, scheduler: "Scheduler", step: int) -> list[BlockMove]:
        """Reserve targets and return this step's block copies (call after scheduling: a request
        the scheduler preempted this step no longer runs and gets none)."""
        if not self.enabled:
            return []
        if self.in_flight:
            raise RuntimeError("commit_copies() must run before new copies are issued")
        if step % self.interval_steps == 0:
            views, requests = self.cluster_view(scheduler)
            self.orders = [
                _Order(m.request_id, m.src, m.dst, m.num_blocks)
                for m in plan_migrations(views, requests, self.perf, self.rebalancer_config)
            ]
        budget = self.limiter.blocks_allowed_this_step()
        moves: list[BlockMove] = []
        running = {r.request_id: r for r in scheduler.running}
        copying: dict[str, set[int]] = {}
        while self.orders and len(moves) < budget:
            order = self.orders[0]
            request = running.get(order.request_id)
            if request is None or order.blocks_left <= 0:
                self.orders.pop(0)
                continue
            table = self.kv.block_table(order.request_id)
            full = request.num_computed_tokens // self.kv.block_size
            busy = copying.setdefault(order.request_id, set())
            movable = [i for i in range(full) if table[i].instance == order.src and i not in busy]
            if not movable:
                self.orders.pop(0)
                continue
            reserved = self.kv.reserve_on(order.dst, order.request_id, 1)
            if not reserved:
                # Reserve-first: no room on the target now; the next round re-plans.
                self.num_failed_reservations += 1
                self.orders.pop(0)
                continue
            # Move the request's latest full blocks first: the home keeps the prefix contiguous.
            index = movable[-1]
            busy.add(index)
            self.in_flight.append(_Copy(order.request_id, index, table[index], reserved[0]))
            moves.append(BlockMove(src=table[index], dst=reserved[0]))
            order.blocks_left -= 1
        self.limiter.record(len(moves))
        return moves

    def forget(self, request_id: str) -> None:
        self.orders = [o for o in self.orders if o.request_id != request_id]


def plan_step(kv: ClusterKVManager, scheduler: "Scheduler", migrations: MigrationCoordinator,
              now: float, step: int) -> "SchedulerOutput":
    """One step's control-plane decisions, in the order the engine and the simulator share:
    heartbeats; commit last step's block copies (each instance finishes its own before executing,
    and this step's plan is built from the tables); schedule; issue new copies, which run in the
    background while the instances compute this step."""
    kv.heartbeat(now, scheduler.home_load())
    migrations.commit_copies(scheduler)
    out = scheduler.schedule()
    out.plan.migrations = migrations.issue_copies(scheduler, step)
    return out


__all__ = ["MigrationCoordinator", "default_perf_model", "Migration", "plan_step"]
