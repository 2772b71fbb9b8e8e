"""Offline policy benchmark: `infinite-llm bench`.

Replays one seeded trace through a fresh engine per placement policy (static = vLLM-multi,
striped = vLLM-single, infinite = Infinite-LLM) with every other engine setting equal, and
compares throughput, memory utilisation, migrations and preemptions.

Replay is in wall-clock time: a request is added once its arrival time has passed and the engine
steps continuously, so a policy that serves faster also admits sooner. Prompts are random token
ids (seeded) of the trace's exact lengths; generation ignores EOS and stops at the trace's output
length, so every policy does exactly the same work per completed request. A request the policy
can never hold (static: longer than one instance's KV pool) is rejected at admission and counted.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from infinite_llm.bench.cli_common import build_workload_trace, comma_separated_subset, write_json
from infinite_llm.bench.profile import set_cpu_threads, torch_threads
from infinite_llm.bench.workloads import TraceRequest, paper_workloads
from infinite_llm.config import EngineConfig
from infinite_llm.sampling import SamplingParams

POLICIES = ("static", "striped", "infinite")
DEFAULT_OUTPUT_DIR = "results/bench"

# Engine settings of the default run: 4 instances with a small KV pool each (2048 tokens), so
# long requests do not fit one instance and memory pressure is real, on a model and trace sized
# to finish all three policies in well under three minutes on a 2-core CPU.
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


class ReplayStalledError(RuntimeError):
    """The engine made no progress for too long while requests were still unfinished."""


@dataclass
class TimelineSample:
    """State after one engine step."""

    t: float  # seconds since the replay started (end of the step)
    step_time_s: float
    generated_tokens: int  # tokens sampled in this step
    blocks_used: list[int]  # per instance, physical blocks in use (own and lent)
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
    elapsed_s: float  # first arrival replayed to the last request finished
    num_steps: int
    num_preemptions: int
    migrated_blocks: int
    blocks_per_instance: int
    mem_util_mean: list[float]  # per instance, step-time-weighted
    mem_util_max: list[float]
    output_lens: dict[str, int] = field(default_factory=dict)  # completed request -> tokens generated
    timeline: list[TimelineSample] = field(default_factory=list)

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Everything but the per-step timeline, plus the derived throughputs."""
        data = asdict(self)
        data.pop("timeline")
        data.pop("output_lens")
        data["generated_tokens_per_s"] = self.generated_tokens_per_s
        data["total_tokens_per_s"] = self.total_tokens_per_s
        return data


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


def run_policy(
    engine_config: EngineConfig,
    trace: Sequence[TraceRequest],
    seed: int = 0,
    progress: Any = None,
    stall_timeout_s: float = 30.0,
) -> PolicyResult:
    """Replay `trace` through a fresh engine built from `engine_config` (its placement policy is
    the one measured). `progress`, if given, is a tqdm-like object updated once per request
    completed or rejected."""
    from infinite_llm.engine import LLMEngine, QueueFullError, RequestTooLongError

    _validate_trace(trace)
    config = copy.deepcopy(engine_config)
    config.model_config = None
    engine = LLMEngine(config)
    try:
        vocab = engine.model_config.vocab_size
        num_instances = config.cluster.num_instances
        blocks_total = config.cache.num_blocks_per_instance
        pending = deque(sorted(trace, key=lambda r: (r.arrival_time_s, r.request_id)))
        prompts = {r.request_id: prompt_token_ids(r, seed, vocab) for r in trace}
        rejected: dict[str, str] = {}
        finished: dict[str, Any] = {}
        seen_tokens: dict[str, int] = {}
        timeline: list[TimelineSample] = []
        last_progress = time.monotonic()
        start = time.monotonic()
        end = start

        while pending or engine.has_unfinished_requests():
            now = time.monotonic()
            while pending and start + pending[0].arrival_time_s <= now:
                request = pending.popleft()
                params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
                try:
                    engine.add_request(request.request_id, prompts[request.request_id], params,
                                       arrival_time=start + request.arrival_time_s)
                except (RequestTooLongError, QueueFullError) as exc:
                    rejected[request.request_id] = f"{type(exc).__name__}: {exc}"
                    if progress is not None:
                        progress.update(1)
            if not engine.has_unfinished_requests():
                if pending:  # idle until the next arrival
                    time.sleep(max(0.0, start + pending[0].arrival_time_s - time.monotonic()))
                last_progress = time.monotonic()
                continue

            step_start = time.monotonic()
            steps_before = engine.num_steps
            outputs = engine.step()
            step_end = time.monotonic()
            generated = 0
            for out in outputs:
                count = len(out.output_token_ids)
                generated += count - seen_tokens.get(out.request_id, 0)
                seen_tokens[out.request_id] = count
                if out.finished:
                    finished[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
            if engine.num_steps == steps_before:
                # Nothing could be scheduled (no plan ran): not a step of the timeline.
                if step_end - last_progress > stall_timeout_s:
                    raise ReplayStalledError(
                        f"policy {config.cluster.placement!r}: no step could be scheduled for "
                        f"{stall_timeout_s:.0f} s ({engine.scheduler.num_running} running, "
                        f"{engine.scheduler.num_waiting} waiting)"
                    )
                time.sleep(0.001)
                continue
            last_progress = end = step_end
            timeline.append(
                TimelineSample(
                    t=step_end - start,
                    step_time_s=step_end - step_start,
                    generated_tokens=generated,
                    blocks_used=[engine.kv.num_used_blocks(i) for i in range(num_instances)],
                    num_running=engine.scheduler.num_running,
                    num_waiting=engine.scheduler.num_waiting,
                )
            )

        mean_util, max_util = _memory_utilisation(timeline, num_instances, blocks_total)
        completed = [finished[r.request_id] for r in trace if r.request_id in finished]
        return PolicyResult(
            policy=config.cluster.placement,
            num_requests=len(trace),
            num_completed=len(completed),
            num_rejected=len(rejected),
            rejected=rejected,
            prompt_tokens=sum(len(o.prompt_token_ids) for o in completed),
            generated_tokens=sum(len(o.output_token_ids) for o in completed),
            elapsed_s=end - start,
            num_steps=engine.num_steps,
            num_preemptions=sum(o.num_preemptions for o in completed),
            migrated_blocks=engine.migrations.num_migrated_blocks,
            blocks_per_instance=blocks_total,
            mem_util_mean=mean_util,
            mem_util_max=max_util,
            output_lens={o.request_id: len(o.output_token_ids) for o in completed},
            timeline=timeline,
        )
    finally:
        engine.shutdown()


def _memory_utilisation(timeline: Sequence[TimelineSample], num_instances: int,
                        blocks_total: int) -> tuple[list[float], list[float]]:
    """Per-instance mean (weighted by step time: the blocks were held during that step) and max."""
    if not timeline or blocks_total <= 0:
        return [0.0] * num_instances, [0.0] * num_instances
    weight = sum(s.step_time_s for s in timeline)
    mean, peak = [], []
    for i in range(num_instances):
        if weight > 0:
            mean.append(sum(s.blocks_used[i] * s.step_time_s for s in timeline) / weight / blocks_total)
        else:
            mean.append(sum(s.blocks_used[i] for s in timeline) / len(timeline) / blocks_total)
        peak.append(max(s.blocks_used[i] for s in timeline) / blocks_total)
    return mean, peak


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


def policy_ratios(results: dict[str, PolicyResult]) -> dict[str, dict[str, Optional[float]]]:
    """infinite/static and infinite/striped for both throughputs (when both policies ran)."""
    ratios: dict[str, dict[str, Optional[float]]] = {}
    ours = results.get("infinite")
    if ours is None:
        return ratios
    for base in ("static", "striped"):
        other = results.get(base)
        if other is None:
            continue
        ratios[f"infinite/{base}"] = {
            "generated_tokens_per_s": _ratio(ours.generated_tokens_per_s, other.generated_tokens_per_s),
            "total_tokens_per_s": _ratio(ours.total_tokens_per_s, other.total_tokens_per_s),
            "completed_requests": _ratio(ours.num_completed, other.num_completed),
        }
    return ratios


def compare_policies(
    engine_config: EngineConfig,
    trace: Sequence[TraceRequest],
    policies: Sequence[str] = POLICIES,
    seed: int = 0,
    output_dir: Optional[str | Path] = None,
    name: str = "offline",
    show_progress: bool = False,
    metadata: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Run every policy on the same trace; return {"results": {policy: PolicyResult},
    "ratios": {...}, "json_path", "plot_path"} (paths None without `output_dir`)."""
    policies = list(policies)
    if not policies:
        raise ValueError("no policies to compare")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown placement policies {unknown}; choose from {list(POLICIES)}")
    if len(set(policies)) != len(policies):
        raise ValueError(f"policies listed twice: {policies}")
    _validate_trace(trace)

    results: dict[str, PolicyResult] = {}
    for policy in policies:
        config = copy.deepcopy(engine_config)
        config.cluster.placement = policy  # type: ignore[assignment]
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(trace), desc=f"bench {policy}", unit="req")
        try:
            results[policy] = run_policy(config, trace, seed, progress=bar)
        finally:
            if bar is not None:
                bar.close()

    ratios = policy_ratios(results)
    json_path = plot_path = None
    if output_dir is not None:
        from infinite_llm.bench.plots import plot_policies

        out = Path(output_dir)
        json_path = out / f"{name}.json"
        plot_path = out / f"{name}.png"
        payload = {
            "metadata": {
                "num_requests": len(trace),
                "seed": seed,
                "num_instances": engine_config.cluster.num_instances,
                "kv_blocks_per_instance": engine_config.cache.num_blocks_per_instance,
                "block_size": engine_config.cache.block_size,
                "model": engine_config.model,
                **(metadata or {}),
            },
            "trace": [asdict(r) for r in trace],
            "results": {p: r.summary() for p, r in results.items()},
            "ratios": ratios,
            "timelines": {p: [asdict(s) for s in r.timeline] for p, r in results.items()},
        }
        write_json(json_path, payload)  # creates `out`, before the plot goes there
        plot_policies(list(results.values()), plot_path, title=name)
    return {"results": results, "ratios": ratios, "json_path": json_path, "plot_path": plot_path}


# ---------------------------------------------------------------------------- report
def format_report(results: dict[str, PolicyResult], ratios: dict[str, dict[str, Optional[float]]]) -> str:
    lines = [
        f"{'policy':<9} {'gen tok/s':>10} {'total tok/s':>12} {'done':>5} {'rejected':>9} "
        f"{'elapsed s':>10} {'steps':>6} {'migrated':>9} {'preempt':>8}  mem util mean / max per instance"
    ]
    for r in results.values():
        mem = " ".join(f"{m:.2f}/{x:.2f}" for m, x in zip(r.mem_util_mean, r.mem_util_max))
        lines.append(
            f"{r.policy:<9} {r.generated_tokens_per_s:>10.1f} {r.total_tokens_per_s:>12.1f} "
            f"{r.num_completed:>5} {r.num_rejected:>9} {r.elapsed_s:>10.2f} {r.num_steps:>6} "
            f"{r.migrated_blocks:>9} {r.num_preemptions:>8}  {mem}"
        )
    for key, values in ratios.items():
        parts = [f"{metric} {value:.2f}x" if value is not None else f"{metric} n/a"
                 for metric, value in values.items()]
        lines.append(f"{key}: " + ", ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
# A policy listed twice passes the parser: compare_policies refuses it, with its own message.
_policy_list = comma_separated_subset(POLICIES, reject_repeats=False)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    workloads = sorted(paper_workloads("local"))
    g = parser.add_argument_group("offline benchmark")
    g.add_argument("--workload", choices=workloads, default=DEFAULT_WORKLOAD,
                   help="trace shape (local scale of the paper's workloads)")
    g.add_argument("--num-requests", type=int, default=DEFAULT_NUM_REQUESTS)
    g.add_argument("--request-rate", type=float, default=DEFAULT_REQUEST_RATE,
                   help="mean arrivals per second (Poisson); inf: all at t=0")
    g.add_argument("--policies", type=_policy_list, default=list(POLICIES),
                   help="placement policies to compare (the engine's --placement is ignored here)")
    g.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the JSON result and PNG plot go")
    g.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default); see bench/profile.py")
    # The engine's own defaults suit serving; the benchmark wants several small instances.
    parser.set_defaults(**BENCH_ENGINE_DEFAULTS)


def build_trace(workload: str, num_requests: int, request_rate: float, seed: int) -> list[TraceRequest]:
    """The local-scale trace of `workload` with the given size, rate and seed."""
    return build_workload_trace("local", workload, num_requests, request_rate, seed)


def main_from_args(args: argparse.Namespace) -> None:
    from infinite_llm.entrypoints.cli import engine_config_from_args

    config = engine_config_from_args(args)
    set_cpu_threads(args.torch_threads, config.cluster.device)
    trace = build_trace(args.workload, args.num_requests, args.request_rate, args.seed)
    prompt_lens = [r.prompt_len for r in trace]
    output_lens = [r.output_len for r in trace]
    print(
        f"workload {args.workload}: {len(trace)} requests at {args.request_rate} req/s, prompts "
        f"{min(prompt_lens)}-{max(prompt_lens)} tokens, outputs {min(output_lens)}-{max(output_lens)}; "
        f"{config.cluster.num_instances} instances x {config.cache.num_blocks_per_instance} blocks x "
        f"{config.cache.block_size} tokens"
    )
    outcome = compare_policies(
        config, trace, args.policies, seed=args.seed, output_dir=args.output_dir,
        name=f"offline_{args.workload}", show_progress=True,
        metadata={"workload": args.workload, "request_rate": args.request_rate,
                  "torch_threads": torch_threads()},
    )
    print(format_report(outcome["results"], outcome["ratios"]))
    print(f"wrote {outcome['json_path']} and {outcome['plot_path']}")


__all__ = [
    "POLICIES",
    "PolicyResult",
    "TimelineSample",
    "ReplayStalledError",
    "prompt_token_ids",
    "run_policy",
    "compare_policies",
    "policy_ratios",
    "format_report",
    "build_trace",
    "add_cli_args",
    "main_from_args",
]
