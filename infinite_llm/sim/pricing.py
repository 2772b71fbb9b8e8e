"""What one instance step costs, and what it costs the instances holding its requests' KV.

An instance steps its own batch. With the cost model's parameters (see `StepCostModel`):

- non-attention: `perf.non_attention_time(batch, tokens)` for the batch homed here;
- local attention: MicroAttention over the batch's KV held on the home, priced by
  `cost.attention_time(kv tokens read, query x KV-token pairs)` (KV reading bounds decode,
  FLOPs bound long prefill chunks; the causal triangle inside a chunk is not subtracted);
- per remote holder h of some request in the batch: per layer, the queries of those requests
  (and the K/V of new tokens whose slots are on h) go out and (out, lse) comes back. The home
  waits for h over the step for `num_layers * 2 * latency + bytes / bandwidth` plus h's guest
  MicroAttention time, which is charged to h's own timeline by the simulator. The home's local
  attention overlaps these waits: attention part = max(local, slowest holder).

A message names the request and the layer, never its blocks (the holder finds them in its
ledger), so the bytes depend on the number of queries and holders, not on the context length.
Compute is divided by the instance's speed factor (1: nominal; the straggler test hook slows one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from infinite_llm.control.plan import SeqWork
from infinite_llm.sim.cluster import StepCostModel

# (tokens each instance holds below the chunk's end, new tokens written on each instance)
TokensOf = Callable[[SeqWork], tuple[dict[int, int], dict[int, int]]]


@dataclass
class GuestWork:
    """What one holder does for one home's step."""

    kv_tokens: int = 0
    pairs: int = 0
    queries: int = 0
    writes: int = 0
    seqs: int = 0


@dataclass
class HolderCost:
    holder: int
    compute_s: float  # guest MicroAttention on the holder (charged to the holder's timeline)
    wait_s: float  # how long the home waits for this holder's partials over the step
    bytes_sent: int  # queries, new K/V and headers out, partials back


@dataclass
class StepPrice:
    num_seqs: int
    num_tokens: int
    non_attention_s: float
    attention_s: float  # local MicroAttention on the home
    host_s: float = 0.0  # engine loop work outside the model (threads sharing a host only)
    round_trip_s: float = 0.0  # waiting for the gManager's and creditors' replies (borrowing)
    holders: list[HolderCost] = field(default_factory=list)
    holders_serial_fraction: float = 0.0  # see StepCostModel

    @property
    def remote_wait_s(self) -> float:
        if not self.holders:
            return 0.0
        waits = [h.wait_s for h in self.holders]
        slowest = max(waits)
        return slowest + self.holders_serial_fraction * (sum(waits) - slowest)

    @property
    def duration_s(self) -> float:
        return (self.round_trip_s + self.non_attention_s + self.host_s
                + max(self.attention_s, self.remote_wait_s))

    @property
    def compute_s(self) -> float:
        """The home's own work (what occupies its device or its share of the host)."""
        return self.non_attention_s + self.attention_s + self.host_s

    @property
    def bytes_sent(self) -> int:
        return sum(h.bytes_sent for h in self.holders)


def price_step(cost: StepCostModel, home: int, batch: Sequence[SeqWork], tokens_of: TokensOf,
               speed: Callable[[int], float]) -> StepPrice:
    """Price `batch` on `home` (see the module docstring)."""
    local = GuestWork()
    guests: dict[int, GuestWork] = {}
    num_tokens = 0
    for work in batch:
        c = len(work.token_ids)
        num_tokens += c
        visible, writes = tokens_of(work)
        for instance, kv in visible.items():
            if instance == home:
                target = local
            else:
                target = guests.get(instance)
                if target is None:
                    target = guests[instance] = GuestWork()
                target.queries += c
                target.seqs += 1
                target.writes += writes.get(instance, 0)
            target.kv_tokens += kv
            target.pairs += c * kv
    s = speed(home)
    price = StepPrice(
        num_seqs=len(batch), num_tokens=num_tokens,
        non_attention_s=cost.perf.non_attention_time(len(batch), num_tokens) / s,
        attention_s=cost.attention_time(local.kv_tokens, local.pairs) / s,
        host_s=cost.step_overhead_s, holders_serial_fraction=cost.holders_serial_fraction,
    )
    price.holders = [_holder_cost(cost, home, h, g, speed(h)) for h, g in sorted(guests.items())]
    return price


def _holder_cost(cost: StepCostModel, home: int, holder: int, work: GuestWork, speed: float) -> HolderCost:
    layers = cost.num_layers
    out = (layers * cost.header_bytes_per_seq * work.seqs + work.queries * cost.query_bytes_per_token
           + work.writes * cost.kv_bytes_per_token)
    back = work.queries * cost.partial_bytes_per_token
    compute = cost.attention_time(work.kv_tokens, work.pairs) / speed
    wait = layers * 2 * cost.latency(home, holder) + (out + back) / cost.bandwidth(home, holder) + compute
    return HolderCost(holder=holder, compute_s=compute, wait_s=wait, bytes_sent=out + back)


__all__ = ["GuestWork", "HolderCost", "StepPrice", "price_step"]
