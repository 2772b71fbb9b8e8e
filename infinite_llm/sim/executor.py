"""The simulated executor: prices a StepPlan instead of running it (pure Python, no torch).

It takes the very `StepPlan` the real executor would get and returns what the real one returns
(one `SampleResult` per sampled sequence, always token `token_id`: simulated requests ignore EOS,
so their output lengths come from the trace), plus the step's simulated duration.

Per instance i (see `StepCostModel` for the parameters):

    t_i = non_attention_i + attention_i + communication_i

- non_attention_i = perf.non_attention_time(batch_i, tokens_i) over the sequences homed on i
  (0 if none: an instance without its own work runs no forward pass);
- attention_i = max(perf.attention_time(kv_i), pairs_i * attn_flop_s_per_kv_query), where kv_i
  counts every KV token i reads this step for any request (own KV and KV it hosts for other
  instances' requests: guest MicroAttention) and pairs_i the query x KV-token pairs it computes
  (a prefill chunk of c tokens over k KV tokens is c * k; the causal triangle inside the chunk
  is not subtracted). Reading bounds decode, FLOPs bound long prefill chunks: a roofline.
- communication_i: DistAttention ships each query token of a request to every other instance
  holding some of its KV and gets (out, lse) back. Bytes go over NVLink inside a node and the
  network across nodes; an instance's time is the larger of its send and receive directions
  (links are full duplex), plus, if it talks to any peer, two message latencies per layer (query
  out, partial back) at its slowest link -- or, with `latency_per_peer` (instances as threads
  on a few cores), summed over its peers.
- migrations copy whole blocks in the background while the step computes (the engine commits
  them at the next step), so they only lengthen t_i when i's links, shared with the attention
  traffic, need longer than the compute: t_i = max(t_i, link_busy_i).

The step takes max_i t_i ("lockstep": one accelerator per instance; the engine runs all
instances in lockstep) or, for instances that are threads sharing a few CPU cores,
max(max_i t_i, sum_i t_i / host_lanes) * (1 + contention * max(0, busy instances - host_cores))
("shared_host", fitted on this machine by benchmarks/bench_sim_validation.py), where the sum
counts work (compute, transfers, `message_cpu_s` per message, `guest_segment_cpu_s` per guest
sequence) but not latency waits, which other instances' threads fill.

Simplified on purpose: no overlap of attention communication with compute (pessimistic for
remote KV); no link contention beyond one instance's own send/receive totals (no switch or NIC
sharing between the GPUs of a node); no tensor-parallel communication; per-layer latency is paid
once per step for all peers together (messages to different peers go out in parallel).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter

from infinite_llm.control.plan import SampleResult, StepPlan
from infinite_llm.sim.cluster import StepCostModel

_instance_of = attrgetter("instance")


@dataclass
class StepTiming:
    """The priced step: its duration and the per-instance parts that made it."""

    step_time_s: float
    instance_time_s: list[float]
    non_attention_s: list[float]
    attention_s: list[float]
    communication_s: list[float]
    attention_bytes: int = 0  # queries and partials on the wire
    migration_bytes: int = 0
    num_tokens: int = 0
    num_sampled: int = 0


@dataclass
class ExecutorTotals:
    """Running sums over all executed steps."""

    num_steps: int = 0
    busy_time_s: float = 0.0
    attention_bytes: int = 0
    migration_bytes: int = 0
    migrated_blocks: int = 0
    # Summed over steps of the per-instance time parts at the slowest instance of each step:
    # what the step time was spent on.
    critical_non_attention_s: float = 0.0
    critical_attention_s: float = 0.0
    critical_communication_s: float = 0.0
    per_instance_busy_s: list[float] = field(default_factory=list)


class SimulatedExecutor:
    """Same `execute(plan) -> list[SampleResult]` call as the real executors."""

    def __init__(self, cost: StepCostModel, num_instances: int, token_id: int = 0) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {token_id}")
        self.cost = cost
        self.num_instances = num_instances
        self.token_id = token_id
        self.last_timing: StepTiming | None = None
        self.totals = ExecutorTotals(per_instance_busy_s=[0.0] * num_instances)

    def execute(self, plan: StepPlan) -> list[SampleResult]:
        timing = self.price(plan)
        self.last_timing = timing
        self._accumulate(timing, len(plan.migrations))
        return [SampleResult(w.request_id, self.token_id) for w in plan.seqs if w.sample]

    def shutdown(self) -> None:
        pass

    # ----------------------------------------------------------------- pricing
    def price(self, plan: StepPlan) -> StepTiming:
        cost = self.cost
        n = self.num_instances
        bs = plan.block_size
        batch = [0] * n
        tokens = [0] * n
        kv_read = [0] * n
        pairs = [0] * n
        sent = [[0, 0] for _ in range(n)]  # [intra-node bytes, inter-node bytes]
        received = [[0, 0] for _ in range(n)]
        # Per instance: peer -> latency of the link to it.
        peers: list[dict[int, float]] = [{} for _ in range(n)]
        guest_segments = [0] * n  # sequences homed elsewhere whose KV this instance attends to
        attention_bytes = 0
        num_tokens = 0
        num_sampled = 0

        for work in plan.seqs:
            home = work.home
            self._check_instance(home, work.request_id)
            c = len(work.token_ids)
            end = work.end_pos
            batch[home] += 1
            tokens[home] += c
            num_tokens += c
            num_sampled += work.sample
            visible = -(-end // bs)
            table = work.block_table
            if len(table) < visible:
                raise ValueError(
                    f"request {work.request_id!r}: block table has {len(table)} blocks, "
                    f"{visible} are needed for {end} tokens"
                )
            if visible == 0:
                continue
            counts = Counter(map(_instance_of, table[:visible]))
            last = table[visible - 1].instance
            for instance, num_blocks in counts.items():
                self._check_instance(instance, work.request_id)
                held = num_blocks * bs - (visible * bs - end if instance == last else 0)
                kv_read[instance] += held
                pairs[instance] += c * held
                if instance != home:
                    link = 0 if cost.same_node(home, instance) else 1
                    out_bytes = c * cost.query_bytes_per_token
                    back_bytes = c * cost.partial_bytes_per_token
                    sent[home][link] += out_bytes
                    received[instance][link] += out_bytes
                    sent[instance][link] += back_bytes
                    received[home][link] += back_bytes
                    attention_bytes += out_bytes + back_bytes
                    latency = cost.intra_node_latency_s if link == 0 else cost.inter_node_latency_s
                    peers[home][instance] = latency
                    peers[instance][home] = latency
                    guest_segments[instance] += 1

        block_bytes = bs * cost.kv_bytes_per_token
        # Link use including the background block copies (which share the links).
        link_sent = [list(x) for x in sent]
        link_received = [list(x) for x in received]
        for move in plan.migrations:
            src, dst = move.src.instance, move.dst.instance
            self._check_instance(src, "migration")
            self._check_instance(dst, "migration")
            link = 0 if cost.same_node(src, dst) else 1
            link_sent[src][link] += block_bytes
            link_received[dst][link] += block_bytes
        migration_bytes = block_bytes * len(plan.migrations)

        perf = cost.perf
        non_attention = [perf.non_attention_time(batch[i], tokens[i]) for i in range(n)]
        attention = [
            max(perf.attention_time(kv_read[i]), pairs[i] * cost.attn_flop_s_per_kv_query) for i in range(n)
        ]
        bw = (cost.intra_node_bandwidth_Bps, cost.inter_node_bandwidth_Bps)
        communication = []
        transfer = []  # the part of communication that is work, not waiting (shared_host)
        for i in range(n):
            out_time = sent[i][0] / bw[0] + sent[i][1] / bw[1]
            in_time = received[i][0] / bw[0] + received[i][1] / bw[1]
            # Two messages per layer (query out, partial back) when the instance has peers.
            if not peers[i]:
                latency = 0.0
            elif cost.latency_per_peer:
                latency = sum(peers[i].values())
            else:
                latency = max(peers[i].values())
            messages = 2 * cost.num_layers * len(peers[i])
            work = (max(out_time, in_time) + messages * cost.message_cpu_s
                    + guest_segments[i] * cost.guest_segment_cpu_s)
            transfer.append(work)
            communication.append(work + 2 * cost.num_layers * latency)
        link_busy = [
            max(link_sent[i][0] / bw[0] + link_sent[i][1] / bw[1],
                link_received[i][0] / bw[0] + link_received[i][1] / bw[1])
            for i in range(n)
        ]
        instance_time = [
            max(a + b + c, busy) for a, b, c, busy in zip(non_attention, attention, communication, link_busy)
        ]
        slowest = max(instance_time) if instance_time else 0.0
        if cost.combine == "shared_host":
            busy = sum(1 for t in instance_time if t > 0)
            contention = 1.0 + cost.contention_per_extra_instance * max(0, busy - cost.host_cores)
            # The host runs the instances' work `host_lanes` at a time; their latency waits are
            # filled by the other instances' work, so only the slowest instance's count in full.
            work = sum(a + b + c for a, b, c in zip(non_attention, attention, transfer))
            step_time = max(slowest, work / cost.host_lanes) * contention
        else:
            step_time = slowest
        return StepTiming(
            step_time_s=step_time,
            instance_time_s=instance_time,
            non_attention_s=non_attention,
            attention_s=attention,
            communication_s=communication,
            attention_bytes=attention_bytes,
            migration_bytes=migration_bytes,
            num_tokens=num_tokens,
            num_sampled=num_sampled,
        )

    def _accumulate(self, timing: StepTiming, num_moves: int) -> None:
        totals = self.totals
        totals.num_steps += 1
        totals.busy_time_s += timing.step_time_s
        totals.attention_bytes += timing.attention_bytes
        totals.migration_bytes += timing.migration_bytes
        totals.migrated_blocks += num_moves
        if timing.instance_time_s:
            i = max(range(self.num_instances), key=timing.instance_time_s.__getitem__)
            totals.critical_non_attention_s += timing.non_attention_s[i]
            totals.critical_attention_s += timing.attention_s[i]
            totals.critical_communication_s += timing.communication_s[i]
        for i, t in enumerate(timing.instance_time_s):
            totals.per_instance_busy_s[i] += t

    def _check_instance(self, instance: int, what: str) -> None:
        if not 0 <= instance < self.num_instances:
            raise ValueError(
                f"{what}: instance {instance} out of range (the simulated cluster has {self.num_instances})"
            )


__all__ = ["ExecutorTotals", "SimulatedExecutor", "StepTiming"]
