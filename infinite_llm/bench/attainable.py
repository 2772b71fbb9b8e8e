"""The best full-trace throughput any schedule could reach on this machine, printed beside the
measured one by `infinite-llm bench`.

A request cannot finish before its arrival plus the time it takes alone on the idle cluster, so
a replay cannot end before the latest of those, nor before the last arrival: the tokens a policy
generates over that span bound its generated tokens/s. Only the requests that some policy
rejects (larger than one instance) are timed alone: they are the long ones, and one of them
arriving late is what can hold a replay open long after the short requests are done.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import EngineConfig
from infinite_llm.sampling import SamplingParams


@dataclass
class AttainableBound:
    """A replay of `policy` cannot end before `floor_s`: `request_id` arrives at `arrival_s`
    and alone takes `solo_s` (or, with no such request, the last arrival is the floor)."""

    policy: str
    request_id: str
    arrival_s: float
    solo_s: float
    floor_s: float
    generated_tokens: int  # what the policy generates in the replay, whatever the schedule

    @property
    def generated_tokens_per_s(self) -> float:
        """The most generated tokens/s the replay could show."""
        return self.generated_tokens / self.floor_s if self.floor_s > 0 else 0.0


def solo_service_times(engine_config: EngineConfig, requests: Sequence[TraceRequest],
                       prompt_of: Callable[[TraceRequest, int], list[int]]) -> dict[str, float]:
    """Seconds from admission to the last token of each request, run one at a time on a fresh
    engine with `engine_config` (a short request first, so that start-up costs are not timed).
    `prompt_of(request, vocab_size)` gives the prompt the replays used."""
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


def _serve_alone(engine: Any, request_id: str, prompt: list[int], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.monotonic()
    engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step(timeout_s=0.01):
            if out.error is not None:
                raise RuntimeError(f"request {request_id} failed when run alone: {out.error}")
    return time.monotonic() - start


def attainable_bound(policy: str, completed: Sequence[str], generated_tokens: int,
                     trace: Sequence[TraceRequest], solo_s: dict[str, float]) -> AttainableBound:
    """The floor of a replay of `policy` that completed `completed`, from the requests timed
    alone in `solo_s` and the trace's last arrival."""
    by_id = {r.request_id: r for r in trace}
    last = max(trace, key=lambda r: r.arrival_time_s)
    bound = AttainableBound(policy, last.request_id, last.arrival_time_s, 0.0, last.arrival_time_s, generated_tokens)
    for request_id in completed:
        if request_id in solo_s:
            arrival = by_id[request_id].arrival_time_s
            if arrival + solo_s[request_id] > bound.floor_s:
                bound = AttainableBound(policy, request_id, arrival, solo_s[request_id],
                                        arrival + solo_s[request_id], generated_tokens)
    return bound


__all__ = ["AttainableBound", "solo_service_times", "attainable_bound"]
