"""Turns the rebalancer's migration orders into bounded, reserve-first block moves (pure Python).

Every `rebalance_interval_steps` steps (infinite policy only) the coordinator builds the
gManager's view of the cluster, asks the greedy rebalancer for migration orders, and queues them.
Each step it then emits at most the rate limit's worth of `BlockMove`s:
- only full blocks (every slot computed) move: they are immutable, so a copy taken at the start
  of a step is exact, and new tokens keep being appended on the home instance;
- space on the target is reserved first; a failed reservation drops the order until the next
  rebalancing round re-plans it;
- the request's block table points at the new block from the same step on, and the old block is
  released at once: the instances copy it out before any write of that step can reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from infinite_llm.config import ClusterConfig, EngineConfig, ModelConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.plan import BlockMove
from infinite_llm.control.rebalancer import (
    InstanceView,
    Migration,
    MigrationRateLimiter,
    RebalancerConfig,
    RequestKV,
    plan_migrations,
)

if TYPE_CHECKING:
    from infinite_llm.control.scheduler import Scheduler


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
                 tokens_per_step: int, enabled: bool = True):
        self.kv = kv
        self.perf = perf
        self.interval_steps = max(1, interval_steps)
        self.enabled = enabled
        self.limiter = MigrationRateLimiter(tokens_per_step, kv.block_size)
        self.rebalancer_config = RebalancerConfig(block_size=kv.block_size)
        self.orders: list[_Order] = []
        self.num_migrated_blocks = 0
        self.num_failed_reservations = 0

    @classmethod
    def for_engine(cls, config: EngineConfig, kv: ClusterKVManager, model_config: Optional[ModelConfig]) -> "MigrationCoordinator":
        cluster: ClusterConfig = config.cluster
        perf_path = getattr(cluster, "perf_model_path", None)
        perf = PerfModel.load(perf_path) if perf_path else default_perf_model(model_config)
        return cls(
            kv, perf, cluster.rebalance_interval_steps, cluster.migration_tokens_per_step,
            enabled=cluster.placement == "infinite" and kv.num_instances > 1,
        )

    # --------------------------------------------------------------- planning
    def cluster_view(self, scheduler: "Scheduler") -> tuple[list[InstanceView], list[RequestKV]]:
        bs = self.kv.block_size
        batch = [0] * self.kv.num_instances
        waiting = [0] * self.kv.num_instances
        tokens = [0] * self.kv.num_instances
        requests: list[RequestKV] = []
        for r in scheduler.running:
            if r.home is None:
                continue
            batch[r.home] += 1
            tokens[r.home] += r.num_tokens
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
        for r in scheduler.waiting:
            # A waiting request's memory demand counts against the least-loaded instance it
            # would be dispatched to; the rebalancer only needs the count.
            target = r.home if r.home is not None else 0
            waiting[target] += 1
        views = []
        for i, rm in enumerate(self.kv.rmanagers):
            views.append(
                InstanceView(
                    instance_id=i,
                    num_blocks=rm.pool.num_blocks,
                    num_free=rm.num_free,
                    lendable=rm.lendable,
                    batch_size=batch[i],
                    num_waiting_for_memory=waiting[i],
                    avg_request_tokens=tokens[i] / batch[i] if batch[i] else 0.0,
                )
            )
        return views, requests

    def plan_step(self, scheduler: "Scheduler", step: int) -> list[BlockMove]:
        if not self.enabled:
            return []
        if step % self.interval_steps == 0:
            views, requests = self.cluster_view(scheduler)
            self.orders = [
                _Order(m.request_id, m.src, m.dst, m.num_blocks)
                for m in plan_migrations(views, requests, self.perf, self.rebalancer_config)
            ]
        budget = self.limiter.blocks_allowed_this_step()
        moves: list[BlockMove] = []
        running = {r.request_id: r for r in scheduler.running}
        while self.orders and len(moves) < budget:
            order = self.orders[0]
            request = running.get(order.request_id)
            if request is None or order.blocks_left <= 0:
                self.orders.pop(0)
                continue
            table = self.kv.block_table(order.request_id)
            full = request.num_computed_tokens // self.kv.block_size
            movable = [i for i in range(full) if table[i].instance == order.src]
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
            old = self.kv.replace_block(order.request_id, index, reserved[0])
            moves.append(BlockMove(src=old, dst=reserved[0]))
            order.blocks_left -= 1
        self.limiter.record(len(moves))
        self.num_migrated_blocks += len(moves)
        return moves

    def step_done(self, moves: list[BlockMove]) -> None:
        """Hook after the instances executed the step's moves (nothing to undo: tables already point
        at the targets and the sources were released when the moves were issued)."""

    def forget(self, request_id: str) -> None:
        self.orders = [o for o in self.orders if o.request_id != request_id]


__all__ = ["MigrationCoordinator", "default_perf_model", "Migration"]
