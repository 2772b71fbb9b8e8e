"""Discrete-event cluster simulator on the real control plane (pure Python, no torch).

The simulator drives the engine's own control-plane objects -- `Scheduler`,
`ClusterKVManager` (rManagers + gManager) and `MigrationCoordinator` -- exactly the way
`LLMEngine.step` does (`plan_step`: heartbeat -> commit last step's block copies -> schedule ->
issue new copies; then executor.execute -> scheduler.update), and replaces only the executor by
`SimulatedExecutor`, which prices the plan with a performance model instead of running it.

Time is simulated: a request of the trace is added to the scheduler when the clock reaches its
arrival time; each step advances the clock by the priced step time; when nothing is running or
waiting the clock jumps to the next arrival. A request the policy can never hold is rejected at
admission (RequestTooLongError), like the real engine's HTTP 400; a full waiting queue rejects
too (HTTP 429). Every number is deterministic for a given trace and configuration.

Simplified: prompt token ids are all `token_id` (cost does not depend on values); the control
plane's own CPU time is not charged to the simulated clock; the scheduler's token budget
(`max_num_batched_tokens`) is one budget for the whole cluster, as in the engine.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.kv_manager import PLACEMENT_POLICIES, ClusterKVManager
from infinite_llm.control.migration import MigrationCoordinator, plan_step
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.request import Request
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError, Scheduler
from infinite_llm.sampling import SamplingParams
from infinite_llm.sim.cluster import SimClusterSpec, StepCostModel
from infinite_llm.sim.executor import SimulatedExecutor


class SimulationStalledError(RuntimeError):
    """The control plane scheduled nothing while requests were still unfinished."""


@dataclass
class SimSetup:
    """Everything one simulated run needs besides the trace."""

    cost: StepCostModel
    num_instances: int
    num_blocks_per_instance: int
    block_size: int
    placement: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lend_fraction: float = 0.9
    rebalance_interval_steps: int = 8
    migration_tokens_per_step: int = 1024
    # The model the rebalancer plans with; None: the cost model's PerfModel.
    rebalancer_perf: Optional[PerfModel] = None
    token_id: int = 0
    # Also advance the clock by the host time the control plane itself takes per step
    # (heartbeat, migration planning, scheduling, update). Off by default: it makes results
    # depend on this machine. The validation against the local engine turns it on, because
    # there the control plane is a visible share of a step of a tiny model.
    charge_control_plane: bool = False

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {PLACEMENT_POLICIES}")
        for name in ("num_instances", "num_blocks_per_instance", "block_size", "rebalance_interval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SimSetup.{name} must be an integer >= 1, got {value!r}")
        if self.migration_tokens_per_step < 0:
            raise ValueError(f"SimSetup.migration_tokens_per_step must be >= 0, got {self.migration_tokens_per_step}")

    @classmethod
    def for_cluster(cls, spec: SimClusterSpec, placement: str, scheduler: SchedulerConfig,
                    rebalance_interval_steps: int = 8, migration_tokens_per_step: int = 1024) -> "SimSetup":
        return cls(
            cost=spec.cost_model(),
            num_instances=spec.num_instances,
            num_blocks_per_instance=spec.blocks_per_instance,
            block_size=spec.block_size,
            placement=placement,
            scheduler=scheduler,
            lend_fraction=spec.lend_fraction,
            rebalance_interval_steps=rebalance_interval_steps,
            migration_tokens_per_step=migration_tokens_per_step,
        )


@dataclass
class SimResult:
    """What one policy did with one trace (throughputs are over completed requests)."""

    policy: str
    num_instances: int
    blocks_per_instance: int
    block_size: int
    num_requests: int
    num_completed: int
    num_rejected: int
    rejection_reasons: dict[str, int]
    prompt_tokens: int
    generated_tokens: int
    makespan_s: float  # first arrival to last completion, simulated
    busy_time_s: float  # simulated time spent in steps
    num_steps: int
    num_preemptions: int
    max_context_served: int  # longest prompt + output among completed requests
    max_context_capacity: int  # longest context the policy could ever hold
    mem_util_per_instance: list[float]  # busy-time-weighted used / total blocks
    migrated_blocks: int
    migrated_bytes: int
    attention_bytes: int  # DistAttention queries and partials on the wire
    mean_ttft_s: float
    mean_latency_s: float
    step_time_share: dict[str, float]  # critical path split: non_attention / attention / communication
    wall_time_s: float  # host seconds the simulation took
    control_plane_s: float  # of which in the control plane (scheduler, KV managers, rebalancer)
    completed_ids: list[str] = field(default_factory=list)
    rejected_ids: list[str] = field(default_factory=list)

    @property
    def throughput_tokens_per_s(self) -> float:
        """Prompt + generated tokens of completed requests per simulated second."""
        return (self.prompt_tokens + self.generated_tokens) / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def mem_util_mean(self) -> float:
        values = self.mem_util_per_instance
        return sum(values) / len(values) if values else 0.0

    def summary(self) -> dict:
        """JSON-ready dict, derived throughputs included, request id lists left out."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("completed_ids", "rejected_ids")}
        data["throughput_tokens_per_s"] = self.throughput_tokens_per_s
        data["generated_tokens_per_s"] = self.generated_tokens_per_s
        data["mem_util_mean"] = self.mem_util_mean
        return data


class Simulator:
    """One cluster, one placement policy; `run(trace)` once."""

    def __init__(self, setup: SimSetup) -> None:
        self.setup = setup
        self.kv = ClusterKVManager(
            num_instances=setup.num_instances,
            num_blocks_per_instance=setup.num_blocks_per_instance,
            block_size=setup.block_size,
            lend_fraction=setup.lend_fraction,
            placement=setup.placement,
        )
        self.scheduler = Scheduler(setup.scheduler, self.kv)
        self.migrations = MigrationCoordinator(
            self.kv,
            setup.rebalancer_perf or setup.cost.perf,
            setup.rebalance_interval_steps,
            setup.migration_tokens_per_step,
        )
        self.executor = SimulatedExecutor(setup.cost, setup.num_instances, setup.token_id)
        self.now = 0.0
        self.num_steps = 0
        self.control_plane_s = 0.0  # host seconds spent in the control plane
        self._ran = False

    def _make_request(self, item: TraceRequest) -> Request:
        params = SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True)
        return Request(
            request_id=item.request_id,
            prompt_token_ids=[self.setup.token_id] * item.prompt_len,
            sampling=params,
            arrival_time=item.arrival_time_s,
            max_total_tokens=item.prompt_len + item.output_len,
        )

    def step(self) -> list[Request]:
        """One engine step at the current simulated time; returns the requests it finished."""
        control_started = time.perf_counter()
        out = plan_step(self.kv, self.scheduler, self.migrations, self.now, self.num_steps)
        if out.plan.is_empty():
            return []
        control_s = time.perf_counter() - control_started
        results = self.executor.execute(out.plan)
        self.num_steps += 1
        timing = self.executor.last_timing
        assert timing is not None
        update_started = time.perf_counter()
        finished = []
        # Finish times are stamped at the end of the priced step, as the engine stamps them
        # after its executor returns.
        for request in self.scheduler.update(out, results, self.now + timing.step_time_s):
            if request.is_finished:
                finished.append(request)
                self.migrations.forget(request.request_id)
                self.scheduler.pop_finished(request.request_id)
        control_s += time.perf_counter() - update_started
        self.control_plane_s += control_s
        self.now += timing.step_time_s
        if self.setup.charge_control_plane:
            self.now += control_s
        return finished

    def run(self, trace: Sequence[TraceRequest], max_idle_steps: int = 1000) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulator runs one trace; build a new one for another run")
        self._ran = True
        if not trace:
            raise ValueError("the trace is empty: nothing to simulate")
        ids = [r.request_id for r in trace]
        if len(set(ids)) != len(ids):
            raise ValueError("the trace has duplicate request ids")
        started = time.perf_counter()
        n = self.setup.num_instances
        pending = deque(sorted(trace, key=lambda r: (r.arrival_time_s, r.request_id)))
        first_arrival = pending[0].arrival_time_s
        self.now = first_arrival
        rejected: dict[str, str] = {}
        done: dict[str, Request] = {}
        used_time = [0.0] * n  # sum over steps of used blocks * step time
        idle_steps = 0

        while pending or self.scheduler.has_unfinished():
            while pending and pending[0].arrival_time_s <= self.now:
                item = pending.popleft()
                try:
                    self.scheduler.add_request(self._make_request(item))
                except (RequestTooLongError, QueueFullError) as exc:
                    rejected[item.request_id] = type(exc).__name__
            if not self.scheduler.has_unfinished():
                if pending:
                    self.now = max(self.now, pending[0].arrival_time_s)
                continue
            # Blocks held during the step are those after scheduling (allocation happens in
            # schedule()), so sample usage after the step's allocation by reading it post-step.
            before_steps = self.num_steps
            finished = self.step()
            if self.num_steps == before_steps:
                idle_steps += 1
                if pending and not self.scheduler.running:
                    self.now = max(self.now, pending[0].arrival_time_s)
                    continue
                if idle_steps > max_idle_steps:
                    raise SimulationStalledError(
                        f"policy {self.setup.placement!r}: nothing scheduled for {idle_steps} steps "
                        f"({self.scheduler.num_running} running, {self.scheduler.num_waiting} waiting)"
                    )
                continue
            idle_steps = 0
            timing = self.executor.last_timing
            assert timing is not None
            dt = timing.step_time_s
            for i, rm in enumerate(self.kv.rmanagers):
                used_time[i] += rm.pool.num_used * dt
            for request in finished:
                done[request.request_id] = request

        totals = self.executor.totals
        completed = [done[r.request_id] for r in trace if r.request_id in done]
        prompt_tokens = sum(r.num_prompt_tokens for r in completed)
        generated = sum(len(r.output_token_ids) for r in completed)
        last_finish = max((r.finished_time or 0.0) for r in completed) if completed else first_arrival
        busy = totals.busy_time_s
        blocks = self.setup.num_blocks_per_instance
        critical = totals.critical_non_attention_s + totals.critical_attention_s + totals.critical_communication_s
        reasons: dict[str, int] = {}
        for reason in rejected.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return SimResult(
            policy=self.setup.placement,
            num_instances=n,
            blocks_per_instance=blocks,
            block_size=self.setup.block_size,
            num_requests=len(trace),
            num_completed=len(completed),
            num_rejected=len(rejected),
            rejection_reasons=reasons,
            prompt_tokens=prompt_tokens,
            generated_tokens=generated,
            makespan_s=last_finish - first_arrival,
            busy_time_s=busy,
            num_steps=self.num_steps,
            num_preemptions=sum(r.num_preemptions for r in completed),
            max_context_served=max((r.num_tokens for r in completed), default=0),
            max_context_capacity=self.scheduler.max_context(),
            mem_util_per_instance=[u / (blocks * busy) if busy > 0 else 0.0 for u in used_time],
            migrated_blocks=self.migrations.num_migrated_blocks,
            migrated_bytes=totals.migration_bytes,
            attention_bytes=totals.attention_bytes,
            mean_ttft_s=_mean([(r.first_token_time or r.arrival_time) - r.arrival_time for r in completed]),
            mean_latency_s=_mean([(r.finished_time or r.arrival_time) - r.arrival_time for r in completed]),
            step_time_share={
                "non_attention": totals.critical_non_attention_s / critical if critical > 0 else 0.0,
                "attention": totals.critical_attention_s / critical if critical > 0 else 0.0,
                "communication": totals.critical_communication_s / critical if critical > 0 else 0.0,
            },
            wall_time_s=time.perf_counter() - started,
            control_plane_s=self.control_plane_s,
            completed_ids=[r.request_id for r in completed],
            rejected_ids=[r.request_id for r in trace if r.request_id in rejected],
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def simulate(setup: SimSetup, trace: Sequence[TraceRequest]) -> SimResult:
    """Run `trace` through a fresh simulated cluster."""
    return Simulator(setup).run(trace)


__all__ = ["SimResult", "SimSetup", "SimulationStalledError", "Simulator", "simulate"]
