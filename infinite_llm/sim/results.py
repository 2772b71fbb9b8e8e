"""What one simulated run produced: per-request records and cluster totals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from infinite_llm.sim.requests import RequestRecord


@dataclass
class SimResult:
    """One policy on one trace. Throughputs count completed requests only."""

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
    busy_time_s: float  # instance-seconds of compute (own steps and guest attention)
    num_steps: int  # over all instances
    num_preemptions: int
    max_context_served: int  # longest prompt + output among completed requests
    max_context_capacity: int  # longest context the policy could ever hold
    mem_util_per_instance: list[float]  # time-mean used / total blocks over the makespan
    migrated_blocks: int
    migrated_bytes: int
    attention_bytes: int  # DistAttention queries, new K/V and partials on the wire
    decode_steps: int  # steps whose batch was decodes only
    decode_bytes: int  # attention bytes of those steps
    decode_exchanges: int  # (step, remote holder) pairs of those steps
    num_borrows: int  # borrow calls (grants + refusals)
    num_refusals: int
    mean_ttft_s: float
    mean_latency_s: float
    # Where the instances' step time went, summed over instances: own non-attention and local
    # attention, waiting for holders beyond the local attention, borrow round trips; and the
    # guest attention they served for other homes.
    time_split_s: dict[str, float]
    wall_time_s: float  # host seconds the simulation took
    records: list[RequestRecord] = field(default_factory=list)

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

    @property
    def completed_ids(self) -> list[str]:
        return [r.request_id for r in self.records if r.completed]

    @property
    def rejected_ids(self) -> list[str]:
        return [r.request_id for r in self.records if r.rejected is not None]

    def record(self, request_id: str) -> Optional[RequestRecord]:
        return next((r for r in self.records if r.request_id == request_id), None)

    def subset_throughput(self, request_ids: Iterable[str]) -> float:
        """Tokens/s of those requests: their completed tokens over the span from the first one's
        arrival to the last one's completion (0 if none completed)."""
        wanted = set(request_ids)
        chosen = [r for r in self.records if r.request_id in wanted]
        done = [r for r in chosen if r.completed]
        if not done:
            return 0.0
        span = max(r.finished_s for r in done) - min(r.arrival_s for r in chosen)  # type: ignore[type-var]
        return sum(r.tokens for r in done) / span if span > 0 else 0.0

    @property
    def decode_bytes_per_step(self) -> float:
        return self.decode_bytes / self.decode_steps if self.decode_steps else 0.0

    @property
    def decode_bytes_per_holder(self) -> float:
        """Bytes one decode step exchanges with one remote holder (both ways)."""
        return self.decode_bytes / self.decode_exchanges if self.decode_exchanges else 0.0

    def summary(self) -> dict:
        """JSON-ready dict, derived throughputs included, per-request records left out."""
        data = {k: v for k, v in self.__dict__.items() if k != "records"}
        data["throughput_tokens_per_s"] = self.throughput_tokens_per_s
        data["generated_tokens_per_s"] = self.generated_tokens_per_s
        data["mem_util_mean"] = self.mem_util_mean
        return data


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


__all__ = ["SimResult", "mean"]
