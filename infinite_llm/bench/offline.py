"""Offline policy benchmark: `infinite-llm bench`.

Replays one seeded trace through a fresh engine per placement policy (static = vLLM-multi,
striped = KV-sharded serving, infinite = Infinite-LLM) with every other engine setting equal,
and compares throughput, memory utilisation, migrations and preemptions.

Replay is in wall-clock time: a request is added once its arrival time has passed, and the
instances run on their own, so a policy that serves faster also admits sooner. Prompts are
random token ids (seeded) of the trace's exact lengths; generation ignores EOS and stops at the
trace's output length, so every policy does exactly the same work per completed request. A
request the policy can never hold (static: longer than one instance's KV pool) is rejected at
admission and counted.

Three views of throughput, because a policy that serves more requests also does more work:
- full trace: every request the policy completed, first arrival to last finish;
- common in full: only the requests every policy completed, measured inside the full-trace run
  (their tokens over the time their last one finished), so serving the long requests is
  charged to the policy that serves them;
- equal work: a second replay of only those common requests (same arrivals), so every policy
  does the very same work.
Runs are repeated (`--repeats`), the policy order alternating between repeats, and medians are
reported with the per-repeat spread: a single run on a shared machine is too noisy to decide.
Beside the full-trace ratio, the most any schedule could reach: the requests only infinite served
are timed alone, and a replay cannot end before one of them arrives and runs (bench/attainable.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from infinite_llm.bench.attainable import AttainableBound, attainable_bound, solo_service_times
from infinite_llm.bench.cli_common import build_workload_trace, comma_separated_subset, write_json
from infinite_llm.bench.profile import set_cpu_threads, torch_threads
from infinite_llm.bench.workloads import TraceRequest, WorkloadSpec, make_trace, paper_workloads
from infinite_llm.config import EngineConfig
from infinite_llm.sampling import SamplingParams

POLICIES = ("static", "striped", "infinite")
DEFAULT_OUTPUT_DIR = "results/bench"
PHASES = ("full", "common_in_full", "equal_work")
PHASE_TITLES = {
    "full": "full trace",
    "common_in_full": "common requests, inside the full-trace run",
    "equal_work": "equal work (replay of the requests every policy served)",
}

# Engine settings of the default run: 4 instances with a small KV pool each (2048 tokens), so
# long requests do not fit one instance and memory pressure is real, on a model and trace sized
# to finish all three policies in a few minutes on a 2-core CPU.
BENCH_ENGINE_DEFAULTS: dict[str, Any] = {
    "num_instances": 4,
    "kv_blocks_per_instance": 128,
    "block_size": 16,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 256,
}
DEFAULT_WORKLOAD = "mixed"
DEFAULT_NUM_REQUESTS = 48
DEFAULT_REQUEST_RATE = 16.0
DEFAULT_REPEATS = 2
LONG_TAIL = "longtail"
# The timeline samples block usage at most this often (the gManager's view changes no faster).
TIMELINE_PERIOD_S = 0.05


class ReplayStalledError(RuntimeError):
    """No request produced output for too long while requests were still unfinished."""


@dataclass
class TimelineSample:
    """The cluster as the replay saw it at one moment."""

    t: float  # seconds since the replay started
    interval_s: float  # time since the previous sample
    generated_tokens: int  # tokens that arrived since the previous sample
    blocks_used: list[int]  # per instance, physical blocks in use (own and lent), heartbeat view
    num_running: int
    num_waiting: int


@dataclass
class PolicyResult:
    policy: str
    num_requests: int
    num_completed: int
    num_rejected: int
    rejected: dict[str, str]  # request id -> reason
    prompt_tokens: int  # of completed requests
    generated_tokens: int  # of completed requests
    elapsed_s: float  # replay start to the last request finished
    num_steps: int  # batches run, all instances together
    num_preemptions: int
    migrated_blocks: int
    blocks_per_instance: int
    mem_util_mean: list[float]  # per instance, time-weighted
    mem_util_max: list[float]
    repeat: int = 0
    cpu_s: float = 0.0  # the process's CPU time over the replay (on the local backend, the cluster's)
    output_lens: dict[str, int] = field(default_factory=dict)  # completed request -> tokens generated
    finish_s: dict[str, float] = field(default_factory=dict)  # completed request -> seconds after start
    timeline: list[TimelineSample] = field(default_factory=list)

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def subset_tokens_per_s(self, request_ids: Sequence[str], trace: dict[str, TraceRequest]) -> tuple[float, float]:
        """(generated, total) tokens/s of `request_ids` alone: their tokens over the time the
        last of them finished (all must have completed)."""
        if not request_ids:
            return 0.0, 0.0
        span = max(self.finish_s[r] for r in request_ids)
        generated = sum(self.output_lens[r] for r in request_ids)
        prompt = sum(trace[r].prompt_len for r in request_ids)
        return (generated / span, (generated + prompt) / span) if span > 0 else (0.0, 0.0)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-request maps and the timeline, plus the derived throughputs."""
        data = asdict(self)
        for key in ("timeline", "output_lens", "finish_s"):
            data.pop(key)
        data["generated_tokens_per_s"] = self.generated_tokens_per_s
        data["total_tokens_per_s"] = self.total_tokens_per_s
        return data


# ---------------------------------------------------------------------------- traces
def long_tail_workload(capacity_tokens: int, num_requests: int = DEFAULT_NUM_REQUESTS,
                       request_rate: float = DEFAULT_REQUEST_RATE, seed: int = 0) -> WorkloadSpec:
    """90% short prompts (16-256 tokens), 10% long ones of 30-60% of the cluster's KV capacity.

    Why tied to the capacity: the point of the case is requests that no single instance holds
    but the pooled cache does, next to many short ones that any instance serves.
    """
    low, high = max(257, int(0.3 * capacity_tokens)), max(258, int(0.6 * capacity_tokens))
    return WorkloadSpec(kind="mixed", num_requests=num_requests, request_rate=request_rate, seed=seed,
                        short_range=(16, 256), long_range=(low, high), long_fraction=0.1,
                        output_range=(8, 64))


def workload_names() -> list[str]:
    return sorted(paper_workloads("local")) + [LONG_TAIL]


def build_trace(workload: str, num_requests: int, request_rate: float, seed: int,
                capacity_tokens: Optional[int] = None) -> list[TraceRequest]:
    """The local-scale trace of `workload` with the given size, rate and seed (`longtail` needs
    the cluster's KV capacity in tokens)."""
    if workload != LONG_TAIL:
        return build_workload_trace("local", workload, num_requests, request_rate, seed)
    if capacity_tokens is None or capacity_tokens < 1:
        raise ValueError(f"the {LONG_TAIL!r} workload needs the cluster's KV capacity in tokens")
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    return make_trace(long_tail_workload(capacity_tokens, num_requests, request_rate, seed))


def prompt_token_ids(request: TraceRequest, seed: int, vocab_size: int) -> list[int]:
    """The request's prompt: `prompt_len` random token ids, the same for every policy."""
    rng = random.Random(f"{seed}:{request.request_id}")
    return [rng.randrange(vocab_size) for _ in range(request.prompt_len)]


def _validate_trace(trace: Sequence[TraceRequest]) -> None:
    if not trace:
        raise ValueError("the trace is empty: nothing to benchmark")
    ids = [r.request_id for r in trace]
    if len(set(ids)) != len(ids):
        raise ValueError("the trace has duplicate request ids")
    for r in trace:
        if r.prompt_len < 1 or r.output_len < 1:
            raise ValueError(f"request {r.request_id!r}: prompt_len and output_len must be >= 1")
        if r.arrival_time_s < 0:
            raise ValueError(f"request {r.request_id!r}: negative arrival time {r.arrival_time_s}")


# ---------------------------------------------------------------------------- one replay
class _Replay:
    """One trace through one engine: admits arrivals, collects outputs, samples the timeline."""

    def __init__(self, engine: Any, trace: Sequence[TraceRequest], seed: int, progress: Any,
                 stall_timeout_s: float) -> None:
        self.engine = engine
        self.progress = progress
        self.stall_timeout_s = stall_timeout_s
        self.num_instances = engine.config.cluster.num_instances
        vocab = engine.model_config.vocab_size
        self.pending = deque(sorted(trace, key=lambda r: (r.arrival_time_s, r.request_id)))
        self.prompts = {r.request_id: prompt_token_ids(r, seed, vocab) for r in trace}
        self.rejected: dict[str, str] = {}
        self.finished: dict[str, Any] = {}
        self.finish_s: dict[str, float] = {}
        self.seen_tokens: dict[str, int] = {}
        self.timeline: list[TimelineSample] = []
        self.start = self.end = time.monotonic()
        self.cpu_start = time.process_time()
        self.cpu_s = 0.0  # the process's CPU time over the replay
        self._last_sample = self.start
        self._tokens_since_sample = 0

    def run(self) -> None:
        last_output = time.monotonic()
        while self.pending or self.engine.has_unfinished_requests():
            self._admit_arrivals()
            if not self.engine.has_unfinished_requests():
                if self.pending:  # idle until the next arrival
                    time.sleep(max(0.0, self._next_arrival() - time.monotonic()))
                last_output = time.monotonic()
                continue
            wait = min(0.01, max(0.0, self._next_arrival() - time.monotonic()))
            outputs = self.engine.step(timeout_s=wait)
            now = time.monotonic()
            if outputs:
                last_output = now
                self._collect(outputs, now)
            elif now - last_output > self.stall_timeout_s:
                self._raise_stalled()
            if outputs or now - self._last_sample >= TIMELINE_PERIOD_S:
                self._sample(now)
        self.cpu_s = time.process_time() - self.cpu_start

    def _next_arrival(self) -> float:
        return self.start + self.pending[0].arrival_time_s if self.pending else math.inf

    def _admit_arrivals(self) -> None:
        from infinite_llm.engine import QueueFullError, RequestTooLongError

        now = time.monotonic()
        while self.pending and self.start + self.pending[0].arrival_time_s <= now:
            request = self.pending.popleft()
            params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
            try:
                self.engine.add_request(request.request_id, self.prompts[request.request_id], params,
                                        arrival_time=self.start + request.arrival_time_s)
            except (RequestTooLongError, QueueFullError) as exc:
                self.rejected[request.request_id] = f"{type(exc).__name__}: {exc}"
                if self.progress is not None:
                    self.progress.update(1)

    def _collect(self, outputs: list[Any], now: float) -> None:
        for out in outputs:
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed on its instance: {out.error}")
            count = len(out.output_token_ids)
            self._tokens_since_sample += count - self.seen_tokens.get(out.request_id, 0)
            self.seen_tokens[out.request_id] = count
            if out.finished:
                self.finished[out.request_id] = out
                self.finish_s[out.request_id] = now - self.start
                self.end = now
                if self.progress is not None:
                    self.progress.update(1)

    def _sample(self, now: float) -> None:
        stats = self.engine.stats()
        used = [0] * self.num_instances
        for row in stats.per_instance:
            used[row["instance"]] = row["blocks_used"]
        self.timeline.append(TimelineSample(
            t=now - self.start, interval_s=now - self._last_sample, generated_tokens=self._tokens_since_sample,
            blocks_used=used, num_running=stats.num_running, num_waiting=stats.num_waiting,
        ))
        self._last_sample = now
        self._tokens_since_sample = 0

    def _raise_stalled(self) -> None:
        stats = self.engine.stats()
        raise ReplayStalledError(
            f"policy {self.engine.config.cluster.placement!r}: no output for {self.stall_timeout_s:.0f} s "
            f"({stats.num_running} running, {stats.num_waiting} waiting, "
            f"{len(self.finished)} finished; blocks {[r['blocks_used'] for r in stats.per_instance]})"
        )


def _settled_stats(engine: Any) -> Any:
    """engine.stats() once every instance has reported its final counters: the router's view
    lags by a heartbeat period plus the gManager's view period."""
    time.sleep(3 * engine.config.cluster.heartbeat_interval_s + 0.1)
    return engine.stats()


def _instance_steps(stats: Any) -> int:
    """Batches run, all instances together (as the last heartbeats reported them)."""
    return sum(entry["num_steps"] for entry in stats.per_instance)


def run_policy(
    engine_config: EngineConfig,
    trace: Sequence[TraceRequest],
    seed: int = 0,
    progress: Any = None,
    stall_timeout_s: float = 30.0,
    repeat: int = 0,
) -> PolicyResult:
    """Replay `trace` through a fresh engine built from `engine_config` (its placement policy is
    the one measured). `progress`, if given, is a tqdm-like object updated once per request
    completed or rejected."""
    from infinite_llm.engine import LLMEngine

    _validate_trace(trace)
    config = copy.deepcopy(engine_config)
    config.model_config = None
    engine = LLMEngine(config)
    try:
        replay = _Replay(engine, trace, seed, progress, stall_timeout_s)
        replay.run()
        stats = _settled_stats(engine)
        blocks_total = config.cache.num_blocks_per_instance
        mean_util, max_util = _memory_utilisation(replay.timeline, config.cluster.num_instances, blocks_total)
        completed = [replay.finished[r.request_id] for r in trace if r.request_id in replay.finished]
        return PolicyResult(
            policy=config.cluster.placement,
            num_requests=len(trace),
            num_completed=len(completed),
            num_rejected=len(replay.rejected),
            rejected=replay.rejected,
            prompt_tokens=sum(len(o.prompt_token_ids) for o in completed),
            generated_tokens=sum(len(o.output_token_ids) for o in completed),
            elapsed_s=replay.end - replay.start,
            num_steps=_instance_steps(stats),
            num_preemptions=stats.num_preemptions,
            migrated_blocks=stats.num_migrated_blocks,
            blocks_per_instance=blocks_total,
            mem_util_mean=mean_util,
            mem_util_max=max_util,
            repeat=repeat,
            cpu_s=replay.cpu_s,
            output_lens={o.request_id: len(o.output_token_ids) for o in completed},
            finish_s=dict(replay.finish_s),
            timeline=replay.timeline,
        )
    finally:
        engine.shutdown()


def _memory_utilisation(timeline: Sequence[TimelineSample], num_instances: int,
                        blocks_total: int) -> tuple[list[float], list[float]]:
    """Per-instance mean (weighted by the interval each sample closes) and max."""
    if not timeline or blocks_total <= 0:
        return [0.0] * num_instances, [0.0] * num_instances
    weight = sum(s.interval_s for s in timeline)
    mean, peak = [], []
    for i in range(num_instances):
        if weight > 0:
            mean.append(sum(s.blocks_used[i] * s.interval_s for s in timeline) / weight / blocks_total)
        else:
            mean.append(sum(s.blocks_used[i] for s in timeline) / len(timeline) / blocks_total)
        peak.append(max(s.blocks_used[i] for s in timeline) / blocks_total)
    return mean, peak


# ---------------------------------------------------------------------------- comparison
@dataclass
class PhaseRuns:
    """Every repeat of every policy in one phase, and the trace they replayed."""

    trace: list[TraceRequest]
    runs: dict[str, list[PolicyResult]]

    def median_run(self, policy: str) -> PolicyResult:
        """The run with the median generated tokens/s (lower median for an even count)."""
        runs = sorted(self.runs[policy], key=lambda r: r.generated_tokens_per_s)
        return runs[(len(runs) - 1) // 2]


def common_request_ids(runs: dict[str, list[PolicyResult]], trace: Sequence[TraceRequest]) -> list[str]:
    """The requests that every run of every policy completed, in trace order."""
    done = [set(r.output_lens) for policy_runs in runs.values() for r in policy_runs]
    return [r.request_id for r in trace if all(r.request_id in d for d in done)]


def phase_metric(phase: str, common: Sequence[str], trace: dict[str, TraceRequest]) -> Callable[[PolicyResult], tuple[float, float]]:
    """(generated tokens/s, total tokens/s) of one run, as the phase measures it."""
    if phase == "common_in_full":
        return lambda r: r.subset_tokens_per_s(common, trace)
    return lambda r: (r.generated_tokens_per_s, r.total_tokens_per_s)


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


def policy_ratios(phases: dict[str, PhaseRuns], common: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per phase, infinite/static and infinite/striped: the ratio of the medians over repeats
    of generated and total tokens/s, and the range of the per-repeat ratios (repeat r of one
    policy against repeat r of the other: those ran back to back)."""
    ratios: dict[str, dict[str, Any]] = {}
    for phase_name in PHASES:
        source = phases.get("equal_work" if phase_name == "equal_work" else "full")
        if source is None or "infinite" not in source.runs:
            continue
        metric = phase_metric(phase_name, common, {r.request_id: r for r in source.trace})
        ours = [metric(r) for r in source.runs["infinite"]]
        for base in ("static", "striped"):
            if base not in source.runs:
                continue
            theirs = [metric(r) for r in source.runs[base]]
            paired = [_ratio(a[0], b[0]) for a, b in zip(ours, theirs)]
            paired = [p for p in paired if p is not None]
            ratios.setdefault(phase_name, {})[f"infinite/{base}"] = {
                "generated_tokens_per_s": _ratio(statistics.median(o[0] for o in ours),
                                                 statistics.median(t[0] for t in theirs)),
                "total_tokens_per_s": _ratio(statistics.median(o[1] for o in ours),
                                             statistics.median(t[1] for t in theirs)),
                "generated_per_repeat": [min(paired), max(paired)] if paired else None,
            }
    return ratios


def _check_policies(policies: Sequence[str], repeats: int) -> list[str]:
    policies = list(policies)
    if not policies:
        raise ValueError("no policies to compare")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown placement policies {unknown}; choose from {list(POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"policies listed twice: {policies}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    return policies


def run_interleaved(engine_config: EngineConfig, trace: Sequence[TraceRequest], policies: Sequence[str],
                    seed: int, repeats: int, label: str = "", show_progress: bool = False) -> PhaseRuns:
    """Every policy `repeats` times, the order reversed every other repeat, so a slow spell of
    the machine does not land on the same policy each time."""
    runs: dict[str, list[PolicyResult]] = {p: [] for p in policies}
    for repeat in range(repeats):
        order = list(policies) if repeat % 2 == 0 else list(reversed(policies))
        for policy in order:
            config = copy.deepcopy(engine_config)
            config.cluster.placement = policy  # type: ignore[assignment]
            bar = None
            if show_progress:
                from tqdm import tqdm

                bar = tqdm(total=len(trace), desc=f"{label}{policy} #{repeat + 1}", unit="req", leave=False)
            try:
                runs[policy].append(run_policy(config, trace, seed, progress=bar, repeat=repeat))
            finally:
                if bar is not None:
                    bar.close()
    return PhaseRuns(list(trace), runs)


def compare_policies(
    engine_config: EngineConfig,
    trace: Sequence[TraceRequest],
    policies: Sequence[str] = POLICIES,
    seed: int = 0,
    output_dir: Optional[str | Path] = None,
    name: str = "offline",
    show_progress: bool = False,
    metadata: Optional[dict[str, Any]] = None,
    repeats: int = 1,
    equal_work: bool = True,
) -> dict[str, Any]:
    """Run every policy on the same trace (repeated, interleaved), then, with `equal_work`, on
    the requests every policy completed. Returns {"phases": {"full"|"equal_work": PhaseRuns},
    "results": {policy: median full-trace PolicyResult}, "common": [request ids], "ratios",
    "json_path", "plot_path"} (paths None without `output_dir`)."""
    policies = _check_policies(policies, repeats)
    _validate_trace(trace)
    phases = {"full": run_interleaved(engine_config, trace, policies, seed, repeats, "full ", show_progress)}
    common = common_request_ids(phases["full"].runs, trace)
    if equal_work and common and len(policies) > 1:
        subset = [r for r in trace if r.request_id in set(common)]
        phases["equal_work"] = run_interleaved(engine_config, subset, policies, seed, repeats, "equal ", show_progress)
    ratios = policy_ratios(phases, common)
    results = {p: phases["full"].median_run(p) for p in policies}
    bound = _infinite_bound(engine_config, phases["full"], common, seed)
    outcome: dict[str, Any] = {"phases": phases, "results": results, "common": common, "ratios": ratios,
                               "attainable": bound, "json_path": None, "plot_path": None}
    if output_dir is not None:
        outcome["json_path"], outcome["plot_path"] = _write_outputs(
            Path(output_dir), name, engine_config, seed, repeats, phases, common, ratios, metadata, bound)
    return outcome


def _infinite_bound(engine_config: EngineConfig, full: PhaseRuns, common: Sequence[str],
                    seed: int) -> Optional[AttainableBound]:
    """The floor of infinite's full-trace replay (see bench/attainable.py), when it served
    requests that another policy rejected; None otherwise."""
    if "infinite" not in full.runs or len(full.runs) < 2:
        return None
    run = full.median_run("infinite")
    common_ids = set(common)
    extra = [r for r in full.trace if r.request_id in run.output_lens and r.request_id not in common_ids]
    if not extra:
        return None
    config = copy.deepcopy(engine_config)
    config.cluster.placement = "infinite"
    solo = solo_service_times(config, extra, lambda r, vocab: prompt_token_ids(r, seed, vocab))
    # Static served the others: its CPU time is their work (known only if this process ran it).
    base_cpu = None
    if "static" in full.runs and engine_config.cluster.backend == "local":
        base_cpu = min(r.cpu_s for r in full.runs["static"])
    return attainable_bound("infinite", list(run.output_lens), run.generated_tokens, full.trace, solo, base_cpu)


def _write_outputs(out: Path, name: str, engine_config: EngineConfig, seed: int, repeats: int,
                   phases: dict[str, PhaseRuns], common: list[str], ratios: dict[str, Any],
                   metadata: Optional[dict[str, Any]],
                   bound: Optional[AttainableBound] = None) -> tuple[Path, Path]:
    from infinite_llm.bench.plots import plot_policies

    full = phases["full"]
    payload = {
        "metadata": {
            "num_requests": len(full.trace), "seed": seed, "repeats": repeats,
            "num_instances": engine_config.cluster.num_instances,
            "kv_blocks_per_instance": engine_config.cache.num_blocks_per_instance,
            "block_size": engine_config.cache.block_size, "model": engine_config.model,
            **(metadata or {}),
        },
        "trace": [asdict(r) for r in full.trace],
        "common_requests": common,
        "results": {phase: {p: [r.summary() for r in runs] for p, runs in pr.runs.items()}
                    for phase, pr in phases.items()},
        "ratios": ratios,
        "attainable": asdict(bound) if bound is not None else None,
        "timelines": {p: [asdict(s) for s in full.median_run(p).timeline] for p in full.runs},
    }
    json_path = write_json(out / f"{name}.json", payload)  # creates `out`, before the plot goes there
    plot_path = plot_policies([full.median_run(p) for p in full.runs], out / f"{name}.png", title=name)
    return json_path, plot_path


# ---------------------------------------------------------------------------- report
def _phase_table(phase: str, pr: PhaseRuns, common: Sequence[str]) -> list[str]:
    metric = phase_metric(phase, common, {r.request_id: r for r in pr.trace})
    lines = [f"-- {PHASE_TITLES[phase]}",
             f"{'policy':<9} {'gen tok/s':>10} {'(min-max)':>15} {'total tok/s':>12} {'done':>5} "
             f"{'rejected':>9} {'elapsed s':>10} {'steps':>6} {'migrated':>9} {'preempt':>8}  "
             f"mem util mean / max per instance"]
    for policy, runs in pr.runs.items():
        values = [metric(r) for r in runs]
        gen = [v[0] for v in values]
        head = (f"{policy:<9} {statistics.median(gen):>10.1f} {f'({min(gen):.1f}-{max(gen):.1f})':>15} "
                f"{statistics.median(v[1] for v in values):>12.1f}")
        med = pr.median_run(policy)
        if phase == "common_in_full":
            # The other columns describe the whole run: the full-trace table has them.
            span = statistics.median(max(r.finish_s[c] for c in common) for r in runs)
            lines.append(f"{head} {len(common):>5} {'':>9} {span:>10.2f}")
            continue
        mem = " ".join(f"{m:.2f}/{x:.2f}" for m, x in zip(med.mem_util_mean, med.mem_util_max))
        lines.append(
            f"{head} {med.num_completed:>5} {med.num_rejected:>9} {med.elapsed_s:>10.2f} {med.num_steps:>6} "
            f"{max(r.migrated_blocks for r in runs):>9} {max(r.num_preemptions for r in runs):>8}  {mem}"
        )
    return lines


def format_report(outcome: dict[str, Any]) -> str:
    """Per phase, each policy's median over repeats (spread of generated tokens/s, the most
    blocks migrated and preemptions of any repeat), then the ratios."""
    phases, common, ratios = outcome["phases"], outcome["common"], outcome["ratios"]
    lines = []
    for phase in PHASES:
        source = phases.get("equal_work" if phase == "equal_work" else "full")
        if source is None or (phase != "full" and not common):
            continue
        lines += _phase_table(phase, source, common)
    lines.append(f"common requests: {len(common)} of {len(phases['full'].trace)}")
    for phase, by_base in ratios.items():
        for key, values in by_base.items():
            gen, total, spread = (values["generated_tokens_per_s"], values["total_tokens_per_s"],
                                  values["generated_per_repeat"])
            fmt = lambda v: f"{v:.2f}x" if v is not None else "n/a"  # noqa: E731
            per = f" (per repeat {spread[0]:.2f}-{spread[1]:.2f}x)" if spread else ""
            lines.append(f"{PHASE_TITLES[phase]}: {key} generated tok/s {fmt(gen)}{per}, total tok/s {fmt(total)}")
    bound = outcome.get("attainable")
    if bound is not None and "static" in phases["full"].runs:
        static = statistics.median(r.generated_tokens_per_s for r in phases["full"].runs["static"])
        lines.append(
            f"full trace: no schedule could make infinite/static generated tok/s more than "
            f"{bound.generated_tokens_per_s / static:.2f}x on this machine: {bound.explain()}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
# A policy listed twice passes the parser: compare_policies refuses it, with its own message.
_policy_list = comma_separated_subset(POLICIES, reject_repeats=False)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("offline benchmark")
    g.add_argument("--workload", choices=workload_names(), default=DEFAULT_WORKLOAD,
                   help=f"trace shape (local scale of the paper's workloads; {LONG_TAIL}: 90%% short "
                        "prompts, 10%% of 30-60%% of the cluster's KV capacity)")
    g.add_argument("--num-requests", type=int, default=DEFAULT_NUM_REQUESTS)
    g.add_argument("--request-rate", type=float, default=DEFAULT_REQUEST_RATE,
                   help="mean arrivals per second (Poisson); inf: all at t=0")
    g.add_argument("--policies", type=_policy_list, default=list(POLICIES),
                   help="placement policies to compare (the engine's --placement is ignored here)")
    g.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="runs per policy and phase, the policy order alternating (medians reported)")
    g.add_argument("--no-equal-work", action="store_true",
                   help="skip the second replay of only the requests every policy served")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the JSON result and PNG plot go")
    g.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default); see bench/profile.py")
    # The engine's own defaults suit serving; the benchmark wants several small instances.
    parser.set_defaults(**BENCH_ENGINE_DEFAULTS)


def main_from_args(args: argparse.Namespace) -> None:
    from infinite_llm.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    set_cpu_threads(args.torch_threads, config.cluster.device)
    capacity = config.cluster.num_instances * config.cache.num_blocks_per_instance * config.cache.block_size
    trace = build_trace(args.workload, args.num_requests, args.request_rate, args.seed, capacity)
    prompt_lens = [r.prompt_len for r in trace]
    output_lens = [r.output_len for r in trace]
    print(
        f"workload {args.workload}: {len(trace)} requests at {args.request_rate} req/s, prompts "
        f"{min(prompt_lens)}-{max(prompt_lens)} tokens, outputs {min(output_lens)}-{max(output_lens)}; "
        f"{config.cluster.num_instances} instances x {config.cache.num_blocks_per_instance} blocks x "
        f"{config.cache.block_size} tokens; {args.repeats} repeat(s), policy order alternating"
    )
    outcome = compare_policies(
        config, trace, args.policies, seed=args.seed, output_dir=args.output_dir,
        name=f"offline_{args.workload}", show_progress=True, repeats=args.repeats,
        equal_work=not args.no_equal_work,
        metadata={"workload": args.workload, "request_rate": args.request_rate,
                  "torch_threads": torch_threads()},
    )
    print(format_report(outcome))
    print(f"wrote {outcome['json_path']} and {outcome['plot_path']}")


__all__ = [
    "POLICIES",
    "PolicyResult",
    "PhaseRuns",
    "TimelineSample",
    "ReplayStalledError",
    "long_tail_workload",
    "prompt_token_ids",
    "run_policy",
    "run_interleaved",
    "compare_policies",
    "common_request_ids",
    "policy_ratios",
    "format_report",
    "build_trace",
    "add_cli_args",
    "main_from_args",
]
