"""Synthetic request traces for benchmarks and the simulator (pure Python).

A trace is a list of `TraceRequest`s: when each request arrives and how many prompt and output
tokens it has. Traces are generated from a `WorkloadSpec`, seeded, so a benchmark and the
simulator can replay the very same requests.

Distributions (documented here because results depend on them):
- prompt length: "short" is log-uniform over `short_range`, "long" log-uniform over
  `long_range` (inclusive integer bounds; log-uniform spreads requests evenly over orders of
  magnitude, which is how context lengths of long-context workloads look); "mixed" draws long
  with probability `long_fraction`, short otherwise.
- output length: uniform integer over `output_range` (inclusive).
- arrivals: "poisson" has exponential gaps with mean 1/request_rate; "gamma" has gamma gaps with
  shape `burstiness` and the same mean, so burstiness < 1 is burstier than Poisson and > 1 more
  regular (burstiness 1 is Poisson). request_rate = inf puts every arrival at t = 0. The process
  starts at t = 0, so the first request arrives after one gap.

Lengths and arrivals come from two independent streams derived from `seed`, so the same seed at
a different request rate gives the same requests, only arriving at other times: sweeps over the
rate compare like with like.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from typing import Literal, Sequence, Union

WorkloadKind = Literal["short", "long", "mixed"]
ArrivalProcess = Literal["poisson", "gamma"]


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_time_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"TraceRequest.request_id must be a non-empty string, got {self.request_id!r}")
        if not (math.isfinite(self.arrival_time_s) and self.arrival_time_s >= 0):
            raise ValueError(f"TraceRequest {self.request_id}: arrival_time_s must be finite and >= 0, "
                             f"got {self.arrival_time_s}")
        for name in ("prompt_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TraceRequest {self.request_id}: {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class WorkloadSpec:
    kind: WorkloadKind
    num_requests: int
    request_rate: float  # requests/s; math.inf: all at t = 0
    seed: int
    short_range: tuple[int, int]
    long_range: tuple[int, int]
    long_fraction: float  # share of long requests in "mixed"
    output_range: tuple[int, int]
    arrival: ArrivalProcess = "poisson"
    burstiness: float = 1.0  # gamma shape (arrival="gamma")

    def __post_init__(self) -> None:
        if self.kind not in ("short", "long", "mixed"):
            raise ValueError(f"WorkloadSpec.kind must be 'short', 'long' or 'mixed', got {self.kind!r}")
        if isinstance(self.num_requests, bool) or not isinstance(self.num_requests, int) or self.num_requests < 0:
            raise ValueError(f"WorkloadSpec.num_requests must be an integer >= 0, got {self.num_requests!r}")
        if not self.request_rate > 0:  # also rejects NaN
            raise ValueError(f"WorkloadSpec.request_rate must be > 0 (math.inf: all at once), got {self.request_rate}")
        for name in ("short_range", "long_range", "output_range"):
            _check_range(name, getattr(self, name))
        if not 0 <= self.long_fraction <= 1:
            raise ValueError(f"WorkloadSpec.long_fraction must be in [0, 1], got {self.long_fraction}")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"WorkloadSpec.arrival must be 'poisson' or 'gamma', got {self.arrival!r}")
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ValueError(f"WorkloadSpec.burstiness must be finite and > 0, got {self.burstiness}")


def make_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    """Generate the trace `spec` describes (see the module docstring for the distributions)."""
    root = random.Random(spec.seed)
    lengths = random.Random(root.getrandbits(64))
    arrivals = random.Random(root.getrandbits(64))
    trace = []
    now = 0.0
    width = len(str(max(spec.num_requests - 1, 0)))
    for index in range(spec.num_requests):
        now += _gap(arrivals, spec)
        trace.append(
            TraceRequest(
                request_id=f"{spec.kind}-{spec.seed}-{index:0{width}d}",
                arrival_time_s=now,
                prompt_len=_prompt_len(lengths, spec),
                output_len=lengths.randint(*spec.output_range),
            )
        )
    return trace


def _gap(rng: random.Random, spec: WorkloadSpec) -> float:
    if math.isinf(spec.request_rate):
        return 0.0
    if spec.arrival == "poisson":
        return rng.expovariate(spec.request_rate)
    # Gamma(shape k, scale 1/(k * rate)) has mean 1/rate and coefficient of variation 1/sqrt(k).
    return rng.gammavariate(spec.burstiness, 1.0 / (spec.burstiness * spec.request_rate))


def _prompt_len(rng: random.Random, spec: WorkloadSpec) -> int:
    if spec.kind == "short":
        bounds = spec.short_range
    elif spec.kind == "long":
        bounds = spec.long_range
    else:
        bounds = spec.long_range if rng.random() < spec.long_fraction else spec.short_range
    return _log_uniform_int(rng, *bounds)


def _log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(high, max(low, value))


def _check_range(name: str, bounds: tuple[int, int]) -> None:
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) for b in bounds)
        or not 1 <= bounds[0] <= bounds[1]
    ):
        raise ValueError(f"WorkloadSpec.{name} must be two integers 1 <= low <= high, got {bounds!r}")


def paper_workloads(scale: Literal["paper", "local"]) -> dict[str, WorkloadSpec]:
    """The three workload shapes of the evaluation: "short", "long" and "mixed".

    "paper": contexts as in the Infinite-LLM evaluation, short prompts of 1K-60K tokens and long
    ones of 60K up to 2000K tokens (served by a 32-GPU cluster). "local": the same shapes scaled
    down for a CPU cluster with a tiny model, contexts of tens to a few thousand tokens. The
    request rate is a starting point; benchmarks sweep it.
    """
    if scale == "paper":
        common = dict(num_requests=200, request_rate=0.5, seed=0, short_range=(1_000, 60_000),
                      long_range=(60_000, 2_000_000), long_fraction=0.2, output_range=(32, 512))
    elif scale == "local":
        common = dict(num_requests=32, request_rate=4.0, seed=0, short_range=(16, 256),
                      long_range=(256, 4_096), long_fraction=0.2, output_range=(8, 64))
    else:
        raise ValueError(f"scale must be 'paper' or 'local', got {scale!r}")
    return {kind: WorkloadSpec(kind=kind, **common) for kind in ("short", "long", "mixed")}


# --------------------------------------------------------------------------- persistence
def save_trace(trace: Sequence[TraceRequest], path: Union[str, os.PathLike]) -> None:
    """Write one JSON object per line, in trace order."""
    with open(path, "w", encoding="utf-8") as f:
        for request in trace:
            f.write(json.dumps(asdict(request)) + "\n")


def load_trace(path: Union[str, os.PathLike]) -> list[TraceRequest]:
    """Read a JSONL trace written by `save_trace` (blank lines are skipped)."""
    expected = {f.name for f in fields(TraceRequest)}
    trace = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
            if not isinstance(record, dict) or set(record) != expected:
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_no}: expected fields {sorted(expected)}, got {got}")
            try:
                trace.append(TraceRequest(**record))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: {e}") from e
    return trace


__all__ = ["TraceRequest", "WorkloadSpec", "make_trace", "paper_workloads", "save_trace", "load_trace"]
