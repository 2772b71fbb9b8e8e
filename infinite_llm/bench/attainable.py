"""The best full-trace throughput any schedule could reach on this machine, printed beside the
measured one by `infinite-llm bench`.

A replay cannot end before
- a request's arrival plus the time it takes alone on the idle cluster, for any request, nor
  before the last arrival; and
- its CPU work spread over every core: at least the work static spent on the requests it served
  plus, for each request only infinite served, that request's work alone (local backend: the
  instances are threads of this process, so the process's CPU time is the cluster's).
The tokens a policy generates over the later of those two floors bound its generated tokens/s.
Only the requests that some policy rejects (larger than one instance) are timed alone: they are
the long ones, whose prefill is most of the extra work and which, arriving late, can hold a
replay open long after the short requests are done.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import EngineConfig
from infinite_llm.sampling import SamplingParams


@dataclass
class SoloRun:
    """One request alone on the idle cluster."""

    wall_s: float  # admission to its last token
    cpu_s: float  # the process's CPU time meanwhile


@dataclass
class AttainableBound:
    """A replay of `policy` cannot end before `floor_s`, the later of two floors: `request_id`
    arrives at `arrival_s` and alone takes `solo_s` (with no such request, the last arrival),
    and `work_cpu_s` of CPU work over `num_cores` cores (None where it was not measured)."""

    policy: str
    request_id: str
    arrival_s: float
    solo_s: float
    work_cpu_s: Optional[float]
    num_cores: int
    generated_tokens: int  # what the policy generates in the replay, whatever the schedule

    @property
    def arrival_floor_s(self) -> float:
        return self.arrival_s + self.solo_s

    @property
    def work_floor_s(self) -> float:
        return self.work_cpu_s / self.num_cores if self.work_cpu_s is not None else 0.0

    @property
    def floor_s(self) -> float:
        return max(self.arrival_floor_s, self.work_floor_s)

    @property
    def generated_tokens_per_s(self) -> float:
        """The most generated tokens/s the replay could show."""
        return self.generated_tokens / self.floor_s if self.floor_s > 0 else 0.0

    def explain(self) -> str:
        if self.solo_s > 0:
            parts = [f"{self.request_id} arrives at {self.arrival_s:.2f} s and takes {self.solo_s:.2f} s alone "
                     f"on the idle cluster"]
        else:
            parts = [f"the last request arrives at {self.arrival_s:.2f} s"]
        if self.work_cpu_s is not None:
            parts.append(f"the work (static's for the requests it served, the others' alone) is "
                         f"{self.work_cpu_s:.1f} CPU-s on {self.num_cores} cores")
        return f"the replay lasts >= {self.floor_s:.2f} s: " + "; ".join(parts)


def solo_service_times(engine_config: EngineConfig, requests: Sequence[TraceRequest],
                       prompt_of: Callable[[TraceRequest, int], list[int]]) -> dict[str, SoloRun]:
    """Each request run alone, one at a time, on a fresh engine with `engine_config` (a short
    request first, so that start-up costs are not timed). `prompt_of(request, vocab_size)` gives
    the prompt the replays used."""
    from infinite_llm.engine import LLMEngine

    config = copy.deepcopy(engine_config)
    config.model_config = None
    engine = LLMEngine(config)
    try:
        _serve_alone(engine, "warm-up", [1, 2, 3], 2)
        vocab = engine.model_config.vocab_size
        return {r.request_id: _serve_alone(engine, r.request_id, prompt_of(r, vocab), r.output_len) for r in requests}
    finally:
        engine.shutdown()


def _serve_alone(engine: Any, request_id: str, prompt: list[int], output_len: int) -> SoloRun:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start, cpu_start = time.monotonic(), time.process_time()
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step(timeout_s=0.01):
            if out.error is not None:
                raise RuntimeError(f"request {request_id} failed when run alone: {out.error}")
    return SoloRun(time.monotonic() - start, time.process_time() - cpu_start)


def num_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def attainable_bound(policy: str, completed: Sequence[str], generated_tokens: int, trace: Sequence[TraceRequest],
                     solo: dict[str, SoloRun], base_cpu_s: Optional[float] = None,
                     cores: Optional[int] = None) -> AttainableBound:
    """The floor of a replay of `policy` that completed `completed`, from the requests run alone
    in `solo`, the trace's last arrival and, given `base_cpu_s` (the CPU work of a replay of the
    requests not in `solo`), the work."""
    by_id = {r.request_id: r for r in trace}
    served_alone = [rid for rid in completed if rid in solo]
    work = None if base_cpu_s is None else base_cpu_s + sum(solo[rid].cpu_s for rid in served_alone)
    last = max(trace, key=lambda r: r.arrival_time_s)
    latest = (last.request_id, last.arrival_time_s, 0.0)
    for rid in served_alone:
        arrival = by_id[rid].arrival_time_s
        if arrival + solo[rid].wall_s > latest[1] + latest[2]:
            latest = (rid, arrival, solo[rid].wall_s)
    return AttainableBound(policy, *latest, work_cpu_s=work, num_cores=cores or num_cores(),
                           generated_tokens=generated_tokens)


__all__ = ["AttainableBound", "SoloRun", "solo_service_times", "attainable_bound", "num_cores"]
