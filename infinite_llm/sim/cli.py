"""`infinite-llm simulate`: the three placement policies on a simulated GPU cluster.

Default: 32 x A100-80GB serving LLaMA2-7B, the paper-scale "mixed" trace (short prompts of
1K-60K tokens, 20% long ones of 60K-2000K), 200 requests at 16 req/s. At that rate requests queue
at their homes (the run lasts about 3x the arrivals' span), but the KV pools stay about a quarter
full: the cluster is not memory-bound, and the largest prompts' prefill sets much of the makespan.
Heavier traces (--num-requests, --request-rate) make memory the limit. Every policy replays:

1. the full trace (static rejects what does not fit one instance); the requests static can
   serve are also measured inside it (infinite must not starve them to serve the long ones);
2. common work: the requests of the trace static can serve, alone (same work for every policy);
3. a probe: one `--probe-context`-token context on an empty cluster (its decode speed);
4. bytes: one request at each `--bytes-contexts` length, attention bytes per decode step;
5. with `--sweep 8,32,256`, step 2 on clusters of those sizes, with the request count and rate
   scaled in proportion to the cluster (same load per instance).

Results are printed as tables with the issue's targets, written as JSON (`--output-dir`,
default results/sim) and plotted (PNG). `--quick` runs 50 requests on 8 instances (the same
load per instance) with a shorter probe, in seconds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from infinite_llm.bench.cli_common import (
    build_workload_trace,
    comma_separated_subset,
    positive_int_list,
)
from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.perf_model import HARDWARE_PRESETS, MODEL_PRESETS
from infinite_llm.sim import report
from infinite_llm.sim.cluster import SimClusterSpec
from infinite_llm.sim.results import SimResult
from infinite_llm.sim.simulator import SimSetup, simulate

POLICIES = ("static", "striped", "infinite")
DEFAULT_OUTPUT_DIR = "results/sim"
DEFAULT_NUM_REQUESTS = 200
DEFAULT_INSTANCES = 32
# --quick keeps the default's load per instance (about 6 requests each) on a smaller cluster.
QUICK_NUM_REQUESTS = 50
QUICK_INSTANCES = 8
DEFAULT_REQUEST_RATE = 16.0
DEFAULT_PROBE_CONTEXT = 2_000_000
QUICK_PROBE_CONTEXT = 500_000  # 2M tokens do not fit 8 instances
DEFAULT_BYTES_CONTEXTS = (10_000, 1_000_000)
QUICK_BYTES_CONTEXTS = (10_000, 300_000)
PROBE_OUTPUT_TOKENS = 64
BYTES_OUTPUT_TOKENS = 16

_policy_list = comma_separated_subset(POLICIES, reject_repeats=True)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster")
    g.add_argument("--hardware", choices=sorted(HARDWARE_PRESETS), default="A100-80GB")
    g.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama2-7b")
    g.add_argument("--instances", type=int, default=None,
                   help=f"serving instances (default {DEFAULT_INSTANCES}, {QUICK_INSTANCES} with --quick)")
    g.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per instance (llama2-70b needs >= 2)")
    g.add_argument("--block-size", type=int, default=256, help="tokens per KV block")
    g.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of HBM for weights + KV; the rest is the activation reserve")
    g.add_argument("--lend-fraction", type=float, default=0.9, help="share of its blocks an instance may lend")
    s = parser.add_argument_group("scheduling (every instance has its own scheduler)")
    s.add_argument("--max-seqs-per-instance", type=int, default=64, help="an instance's max_num_seqs")
    s.add_argument("--max-batched-tokens-per-instance", type=int, default=2048,
                   help="an instance's per-step token budget (and largest prefill chunk)")
    s.add_argument("--prefill-slowdown", type=float, default=SchedulerConfig.prefill_slowdown,
                   help="as the engine's: a running prompt's chunk may make a step this many times a "
                        "decode-only step while others decode or wait (control/pacer.py)")
    s.add_argument("--lone-prefill-slowdown", type=float, default=SchedulerConfig.lone_prefill_slowdown,
                   help="as the engine's: bounds the wait of a request arriving during a prompt alone, "
                        "and paces a prompt alone on an instance others wait on")
    s.add_argument("--headroom-fraction", type=float, default=SchedulerConfig.headroom_fraction,
                   help="as the engine's: the share of its pool every holder of a request larger than "
                        "one instance keeps free when that request is admitted")
    s.add_argument("--spanning-prefill-every", type=int, default=SchedulerConfig.spanning_prefill_every,
                   help="as the engine's: a prompt chunk of a request larger than one instance shares a step "
                        "with requests that fit one at most once every this many steps")
    s.add_argument("--migration-tokens-per-step", type=int, default=1024,
                   help="KV a home copies per step at most while migrating")
    s.add_argument("--heartbeat-interval-s", type=float, default=0.1)
    s.add_argument("--rebalance-interval-s", type=float, default=0.5, help="seconds between rebalancing rounds")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=("short", "long", "mixed"), default="mixed")
    w.add_argument("--num-requests", type=int, default=None,
                   help=f"requests in the trace (default {DEFAULT_NUM_REQUESTS}, {QUICK_NUM_REQUESTS} with --quick)")
    w.add_argument("--request-rate", type=float, default=DEFAULT_REQUEST_RATE, help="mean arrivals/s (Poisson)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--probe-context", type=int, default=None,
                   help=f"context (prompt + output) of the lone-request probe (default {DEFAULT_PROBE_CONTEXT:,}, "
                        f"{QUICK_PROBE_CONTEXT:,} with --quick); 0 skips it")
    w.add_argument("--bytes-contexts", type=positive_int_list, default=None,
                   help="contexts whose attention bytes per decode step are compared "
                        f"(default {','.join(map(str, DEFAULT_BYTES_CONTEXTS))})")
    r = parser.add_argument_group("run")
    r.add_argument("--policies", type=_policy_list, default=list(POLICIES))
    r.add_argument("--sweep", type=positive_int_list, default=None, help="cluster sizes to sweep, e.g. 8,32,256")
    r.add_argument("--quick", action="store_true",
                   help=f"{QUICK_NUM_REQUESTS} requests on {QUICK_INSTANCES} instances: a run of a few seconds")
    r.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where the JSON and PNG files go")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ---------------------------------------------------------------------------- building blocks
def build_trace(workload: str, num_requests: int, request_rate: float, seed: int) -> list[TraceRequest]:
    """The paper-scale trace of `workload` with the given size, rate and seed."""
    return build_workload_trace("paper", workload, num_requests, request_rate, seed)


def fits_one_instance(trace: Sequence[TraceRequest], spec: SimClusterSpec) -> list[TraceRequest]:
    """The requests static placement can serve: prompt + output within one instance's blocks."""
    capacity = spec.blocks_per_instance * spec.block_size
    return [r for r in trace if r.prompt_len + r.output_len <= capacity]


def scheduler_config(args: argparse.Namespace, num_requests: int) -> SchedulerConfig:
    """Every instance's scheduler settings."""
    if args.max_seqs_per_instance < 1 or args.max_batched_tokens_per_instance < 1:
        raise ValueError("--max-seqs-per-instance and --max-batched-tokens-per-instance must be >= 1")
    if min(args.prefill_slowdown, args.lone_prefill_slowdown) <= 1:
        raise ValueError("--prefill-slowdown and --lone-prefill-slowdown must be > 1")
    if args.spanning_prefill_every < 1:
        raise ValueError("--spanning-prefill-every must be >= 1")
    # max_waiting: big enough that no request of the trace is turned away for a full queue.
    return SchedulerConfig(
        max_num_seqs=args.max_seqs_per_instance, max_num_batched_tokens=args.max_batched_tokens_per_instance,
        long_prefill_token_threshold=args.max_batched_tokens_per_instance, max_waiting=max(1024, num_requests),
        prefill_slowdown=args.prefill_slowdown, lone_prefill_slowdown=args.lone_prefill_slowdown,
        headroom_fraction=args.headroom_fraction, spanning_prefill_every=args.spanning_prefill_every,
    )


def run_policies(spec: SimClusterSpec, trace: Sequence[TraceRequest], sched: SchedulerConfig,
                 policies: Sequence[str], args: argparse.Namespace) -> dict[str, SimResult]:
    return {
        policy: simulate(SimSetup.for_cluster(
            spec, policy, sched, migration_tokens_per_step=args.migration_tokens_per_step,
            heartbeat_interval_s=args.heartbeat_interval_s, rebalance_interval_s=args.rebalance_interval_s,
        ), trace)
        for policy in policies
    }


def lone_request(name: str, context: int, output_tokens: int) -> list[TraceRequest]:
    if context <= output_tokens:
        raise ValueError(f"a {name} context must exceed {output_tokens} tokens, got {context}")
    return [TraceRequest(f"{name}-{context}", 0.0, context - output_tokens, output_tokens)]


def _validate(args: argparse.Namespace) -> None:
    for name in ("instances", "tensor_parallel", "block_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.migration_tokens_per_step < 0:
        raise ValueError(f"--migration-tokens-per-step must be >= 0, got {args.migration_tokens_per_step}")
    for name in ("heartbeat_interval_s", "rebalance_interval_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.probe_context is not None and args.probe_context < 0:
        raise ValueError(f"--probe-context must be >= 0, got {args.probe_context}")


def _spec(args: argparse.Namespace, instances: int) -> SimClusterSpec:
    return SimClusterSpec(
        hardware=args.hardware, model=args.model, num_instances=instances, block_size=args.block_size,
        tensor_parallel=args.tensor_parallel, memory_utilization=args.memory_utilization,
        lend_fraction=args.lend_fraction,
    )


# ---------------------------------------------------------------------------- experiments
def run_bytes(spec: SimClusterSpec, sched: SchedulerConfig, policies: Sequence[str], contexts: Sequence[int],
              args: argparse.Namespace) -> dict[str, dict[int, SimResult]]:
    """One request per context, decoding alone: attention bytes per decode step. `static` sends
    none (everything is local), so it is left out."""
    runs: dict[str, dict[int, SimResult]] = {}
    for policy in (p for p in policies if p != "static"):
        for context in contexts:
            trace = lone_request("bytes", context, BYTES_OUTPUT_TOKENS)
            runs.setdefault(policy, {})[context] = run_policies(spec, trace, sched, [policy], args)[policy]
    return runs


def run_sweep(args: argparse.Namespace, base_instances: int, num_requests: int,
              policies: Sequence[str]) -> dict[int, dict[str, SimResult]]:
    sweep: dict[int, dict[str, SimResult]] = {}
    for n in args.sweep:
        n_spec = _spec(args, n)
        scale = n / base_instances
        trace = build_trace(args.workload, max(1, round(num_requests * scale)), args.request_rate * scale, args.seed)
        common = fits_one_instance(trace, n_spec)
        sched = scheduler_config(args, len(common))
        sweep[n] = run_policies(n_spec, common, sched, policies, args)
    return sweep


def _describe(spec: SimClusterSpec, args: argparse.Namespace, trace: Sequence[TraceRequest],
              common: Sequence[TraceRequest], sched: SchedulerConfig) -> None:
    prompts = [r.prompt_len for r in trace]
    print(
        f"simulated cluster: {spec.num_instances} instances x {spec.tensor_parallel} {spec.hardware}, "
        f"{spec.model}; {spec.blocks_per_instance} blocks x {spec.block_size} tokens = "
        f"{spec.blocks_per_instance * spec.block_size:,} KV tokens per instance; lend fraction {spec.lend_fraction}"
    )
    print(
        f"workload {args.workload}: {len(trace)} requests at {args.request_rate} req/s (seed {args.seed}), "
        f"prompts {min(prompts):,}-{max(prompts):,} tokens; {len(common)} fit one instance; each instance: "
        f"{sched.max_num_seqs} seqs, {sched.max_num_batched_tokens} tokens per step, prefill slowdown "
        f"{sched.prefill_slowdown}/{sched.lone_prefill_slowdown}, headroom {sched.headroom_fraction}, spanning prefill every {sched.spanning_prefill_every} steps; heartbeats every "
        f"{args.heartbeat_interval_s} s, rebalancing every {args.rebalance_interval_s} s"
    )


# ---------------------------------------------------------------------------- main
def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation the arguments describe; print the report; return the JSON payload
    (plus "json_path" and "plots")."""
    _validate(args)
    started = time.perf_counter()
    num_requests = args.num_requests or (QUICK_NUM_REQUESTS if args.quick else DEFAULT_NUM_REQUESTS)
    instances = args.instances or (QUICK_INSTANCES if args.quick else DEFAULT_INSTANCES)
    probe_context = args.probe_context if args.probe_context is not None else (
        QUICK_PROBE_CONTEXT if args.quick else DEFAULT_PROBE_CONTEXT)
    bytes_contexts = args.bytes_contexts or list(QUICK_BYTES_CONTEXTS if args.quick else DEFAULT_BYTES_CONTEXTS)
    spec = _spec(args, instances)
    policies = list(args.policies)
    trace = build_trace(args.workload, num_requests, args.request_rate, args.seed)
    common_trace = fits_one_instance(trace, spec)
    sched = scheduler_config(args, len(trace))
    _describe(spec, args, trace, common_trace, sched)

    full, common, longest = run_trace_experiments(spec, trace, common_trace, sched, policies, args)
    probe, probe_id, bytes_runs = run_lone_request_experiments(spec, sched, policies, probe_context,
                                                               bytes_contexts, args)
    sweep: dict[int, dict[str, SimResult]] = {}
    if args.sweep:
        print(f"\n== scaling sweep: common work, load per instance as at {spec.num_instances} ==")
        sweep = run_sweep(args, spec.num_instances, num_requests, policies)
        print(report.sweep_table(sweep))

    subset = [r.request_id for r in common_trace]
    targets = report.check_targets(full, subset, common, longest, probe, probe_id, bytes_runs)
    print("\n== targets (issue 12) ==")
    print(report.targets_text(targets))
    print(
        "\nmodel: roofline PerfModel from datasheet numbers; every instance steps on its own clock; a home waits "
        "per step for its own holders (latency per layer + bytes / bandwidth + their guest attention, overlapped "
        "with its local attention); guest attention is charged to the holder; copies run in the background on "
        "the source's link; see infinite_llm/sim/simulator.py"
    )
    payload = _payload(args, spec, sched, trace, full, common, probe, bytes_runs, sweep, targets, probe_context)
    payload["wall_time_s"] = time.perf_counter() - started
    return _write(args, payload, spec, full, common, sweep, started)


def run_trace_experiments(spec: SimClusterSpec, trace: Sequence[TraceRequest], common_trace: Sequence[TraceRequest],
                          sched: SchedulerConfig, policies: Sequence[str], args: argparse.Namespace,
                          ) -> tuple[dict[str, SimResult], dict[str, SimResult], str]:
    """The full trace and the common work, printed; returns them and the longest request both
    infinite and striped served (the decode-speed comparison)."""
    full = run_policies(spec, trace, sched, policies, args)
    longest = report.longest_served(full) or max(trace, key=lambda r: r.prompt_len + r.output_len).request_id
    subset = [r.request_id for r in common_trace]
    print("\n== full trace ==")
    print(report.policy_table(full))
    print(f"\nthe {len(subset)} requests static can serve, inside the full-trace runs:")
    print(report.subset_table(full, subset))
    print(f"\nthe longest request infinite and striped both served ({longest}), inside the full-trace runs:")
    print(report.decode_table(full, longest))
    common: dict[str, SimResult] = {}
    if common_trace:
        common = run_policies(spec, common_trace, sched, policies, args)
        print(f"\n== common work: the {len(common_trace)} requests static can serve, alone ==")
        print(report.policy_table(common))
    print("\nKV memory utilisation per instance (full trace, time mean):")
    print(report.per_instance_table(full))
    return full, common, longest


def run_lone_request_experiments(spec: SimClusterSpec, sched: SchedulerConfig, policies: Sequence[str],
                                 probe_context: int, bytes_contexts: Sequence[int], args: argparse.Namespace,
                                 ) -> tuple[dict[str, SimResult], Optional[str], dict[str, dict[int, SimResult]]]:
    """The probe (one long context alone: its decode speed) and the bytes per decode step."""
    probe: dict[str, SimResult] = {}
    probe_id = None
    if probe_context:
        probe_trace = lone_request("probe", probe_context, PROBE_OUTPUT_TOKENS)
        probe_id = probe_trace[0].request_id
        probe = run_policies(spec, probe_trace, sched, policies, args)
        print(f"\n== one {probe_context:,}-token context alone on the cluster ==")
        print(report.decode_table(probe, probe_id))
    bytes_runs = run_bytes(spec, sched, policies, bytes_contexts, args)
    if bytes_runs:
        print("\n== attention bytes per decode step of one request (queries, new K/V, partials) ==")
        print(report.bytes_table(bytes_runs))
    return probe, probe_id, bytes_runs


def _payload(args: argparse.Namespace, spec: SimClusterSpec, sched: SchedulerConfig, trace: Sequence[TraceRequest],
             full: dict, common: dict, probe: dict, bytes_runs: dict, sweep: dict, targets: list,
             probe_context: int) -> dict[str, Any]:
    return {
        "config": {
            "cluster": asdict(spec),
            "blocks_per_instance": spec.blocks_per_instance,
            "kv_tokens_per_instance": spec.blocks_per_instance * spec.block_size,
            "scheduler_per_instance": asdict(sched),
            "workload": args.workload,
            "num_requests": len(trace),
            "request_rate": args.request_rate,
            "seed": args.seed,
            "migration_tokens_per_step": args.migration_tokens_per_step,
            "heartbeat_interval_s": args.heartbeat_interval_s,
            "rebalance_interval_s": args.rebalance_interval_s,
            "probe_context": probe_context,
            "quick": bool(args.quick),
        },
        "full_trace": {p: r.summary() for p, r in full.items()},
        "static_servable": {p: r.summary() for p, r in common.items()},
        "probe": {p: r.summary() for p, r in probe.items()},
        "bytes_per_decode_step": {p: {str(c): r.summary() for c, r in runs.items()} for p, runs in bytes_runs.items()},
        "sweep": {str(n): {p: r.summary() for p, r in rs.items()} for n, rs in sweep.items()},
        "targets": targets,
    }


def _write(args: argparse.Namespace, payload: dict[str, Any], spec: SimClusterSpec, full: dict, common: dict,
           sweep: dict, started: float) -> dict[str, Any]:
    out = Path(args.output_dir)
    json_path = report.write_json(out / "simulate.json", payload)
    plots: list[str] = []
    if not args.no_plots:
        title = f"{spec.num_gpus} x {spec.hardware} ({spec.model}), {args.workload} trace"
        plots.append(str(report.plot_policies(full, common, out / "simulate_policies.png", title)))
        if sweep:
            plots.append(str(report.plot_sweep(sweep, out / "simulate_sweep.png", f"{spec.hardware}, {spec.model}")))
    print(f"\nwrote {json_path}" + (f" and {', '.join(plots)}" if plots else "")
          + f" in {time.perf_counter() - started:.1f} s")
    payload["json_path"] = str(json_path)
    payload["plots"] = plots
    return payload


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="infinite-llm simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()


__all__ = ["add_cli_args", "build_trace", "fits_one_instance", "main", "main_from_args", "run_policies"]
