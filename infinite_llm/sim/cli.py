"""`infinite-llm simulate`: the three placement policies on a simulated GPU cluster.

Default: 32 x A100-80GB serving LLaMA2-7B, the paper-scale "mixed" trace (short prompts of
1K-60K tokens, 20% long ones of 60K-2000K), 200 requests at 16 req/s -- a rate that saturates the
cluster, so throughput measures capacity rather than the arrival rate. Every policy replays:

1. the full trace (static rejects what does not fit one instance);
2. the requests of the trace static can serve (same work for every policy: the like-for-like
   throughput comparison);
3. a probe: one request with a `--probe-context`-token context (default 2000K) on an empty cluster;
4. with `--sweep 8,32,256`, step 2 on clusters of those sizes, with the request count and rate
   scaled in proportion to the cluster (same load per instance).

Results are printed as tables, written as JSON (`--output-dir`, default results/sim) and
plotted (PNG). `--quick` runs 50 requests on 8 instances (the same load per instance) and
finishes in well under 30 s.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from infinite_llm.bench.cli_common import build_workload_trace, comma_separated_subset, positive_int_list
from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.perf_model import HARDWARE_PRESETS, MODEL_PRESETS
from infinite_llm.sim import report
from infinite_llm.sim.cluster import SimClusterSpec
from infinite_llm.sim.simulator import SimResult, SimSetup, simulate

POLICIES = ("static", "striped", "infinite")
DEFAULT_OUTPUT_DIR = "results/sim"
DEFAULT_NUM_REQUESTS = 200
DEFAULT_INSTANCES = 32
# --quick keeps the default's load per instance (about 6 requests each) on a smaller cluster.
QUICK_NUM_REQUESTS = 50
QUICK_INSTANCES = 8
DEFAULT_REQUEST_RATE = 16.0
DEFAULT_PROBE_CONTEXT = 2_000_000
PROBE_OUTPUT_TOKENS = 64


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
    s = parser.add_argument_group("scheduling")
    s.add_argument("--max-seqs-per-instance", type=int, default=64,
                   help="max_num_seqs of the (cluster-wide) scheduler is this times --instances")
    s.add_argument("--max-batched-tokens-per-instance", type=int, default=512,
                   help="the scheduler's per-step token budget is this times --instances")
    s.add_argument("--migration-tokens-per-step", type=int, default=1024)
    s.add_argument("--rebalance-interval", type=int, default=8, help="steps between rebalancing rounds")
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=("short", "long", "mixed"), default="mixed")
    w.add_argument("--num-requests", type=int, default=None,
                   help=f"requests in the trace (default {DEFAULT_NUM_REQUESTS}, {QUICK_NUM_REQUESTS} with --quick)")
    w.add_argument("--request-rate", type=float, default=DEFAULT_REQUEST_RATE, help="mean arrivals/s (Poisson)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--probe-context", type=int, default=DEFAULT_PROBE_CONTEXT,
                   help="context length (prompt + output) of the single long-request probe; 0 skips it")
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


def scheduler_config(spec: SimClusterSpec, max_seqs_per_instance: int, max_batched_tokens_per_instance: int,
                     num_requests: int) -> SchedulerConfig:
    if max_seqs_per_instance < 1 or max_batched_tokens_per_instance < 1:
        raise ValueError("--max-seqs-per-instance and --max-batched-tokens-per-instance must be >= 1")
    return SchedulerConfig(
        max_num_seqs=max_seqs_per_instance * spec.num_instances,
        max_num_batched_tokens=max_batched_tokens_per_instance * spec.num_instances,
        # One request's prefill chunk is capped at an instance's share of the budget: the
        # cluster steps in lockstep, so a chunk of the whole cluster's budget on one instance
        # would make every other instance wait for it.
        long_prefill_token_threshold=max_batched_tokens_per_instance,
        # Big enough that no request of the trace is turned away for a full queue.
        max_waiting=max(1024, num_requests),
    )


def run_policies(spec: SimClusterSpec, trace: Sequence[TraceRequest], sched: SchedulerConfig,
                 policies: Sequence[str], migration_tokens_per_step: int,
                 rebalance_interval: int) -> dict[str, SimResult]:
    return {
        policy: simulate(
            SimSetup.for_cluster(spec, policy, sched, rebalance_interval, migration_tokens_per_step), trace
        )
        for policy in policies
    }


def probe_trace(context: int) -> list[TraceRequest]:
    if context <= PROBE_OUTPUT_TOKENS:
        raise ValueError(f"--probe-context must exceed {PROBE_OUTPUT_TOKENS} tokens, got {context}")
    return [TraceRequest(f"probe-{context}", 0.0, context - PROBE_OUTPUT_TOKENS, PROBE_OUTPUT_TOKENS)]


def _validate(args: argparse.Namespace) -> None:
    for name in ("instances", "tensor_parallel", "block_size", "rebalance_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.migration_tokens_per_step < 0:
        raise ValueError(f"--migration-tokens-per-step must be >= 0, got {args.migration_tokens_per_step}")
    if args.probe_context < 0:
        raise ValueError(f"--probe-context must be >= 0, got {args.probe_context}")


def _spec(args: argparse.Namespace, instances: int) -> SimClusterSpec:
    return SimClusterSpec(
        hardware=args.hardware, model=args.model, num_instances=instances, block_size=args.block_size,
        tensor_parallel=args.tensor_parallel, memory_utilization=args.memory_utilization,
        lend_fraction=args.lend_fraction,
    )


# ---------------------------------------------------------------------------- main
def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation the arguments describe; print the report; return the JSON payload
    (plus "json_path" and "plots")."""
    _validate(args)
    started = time.perf_counter()
    num_requests = args.num_requests or (QUICK_NUM_REQUESTS if args.quick else DEFAULT_NUM_REQUESTS)
    instances = args.instances or (QUICK_INSTANCES if args.quick else DEFAULT_INSTANCES)
    spec = _spec(args, instances)
    policies = list(args.policies)
    trace = build_trace(args.workload, num_requests, args.request_rate, args.seed)
    common_trace = fits_one_instance(trace, spec)
    sched = scheduler_config(spec, args.max_seqs_per_instance, args.max_batched_tokens_per_instance, len(trace))
    cluster_label = f"{spec.num_gpus} x {spec.hardware} ({spec.model})"
    prompts = [r.prompt_len for r in trace]
    print(
        f"simulated cluster: {spec.num_instances} instances x {spec.tensor_parallel} {spec.hardware}, "
        f"{spec.model}; {spec.blocks_per_instance} blocks x {spec.block_size} tokens = "
        f"{spec.blocks_per_instance * spec.block_size:,} KV tokens per instance; lend fraction {spec.lend_fraction}"
    )
    print(
        f"workload {args.workload}: {len(trace)} requests at {args.request_rate} req/s (seed {args.seed}), "
        f"prompts {min(prompts):,}-{max(prompts):,} tokens; {len(common_trace)} fit one instance; "
        f"scheduler: {sched.max_num_seqs} seqs, {sched.max_num_batched_tokens} tokens per step"
    )

    mig, interval = args.migration_tokens_per_step, args.rebalance_interval
    full = run_policies(spec, trace, sched, policies, mig, interval)
    print("\n== full trace ==")
    print(report.policy_table(full))
    common: dict[str, SimResult] = {}
    if common_trace:
        common = run_policies(spec, common_trace, sched, policies, mig, interval)
        print(f"\n== the {len(common_trace)} requests static can serve (same work for every policy) ==")
        print(report.policy_table(common))
    print("\nKV memory utilisation per instance (full trace, busy-time mean):")
    print(report.per_instance_table(full))

    probe: dict[str, SimResult] = {}
    if args.probe_context:
        probe = run_policies(spec, probe_trace(args.probe_context), sched, policies, mig, interval)
        print(f"\n== one {args.probe_context:,}-token context on an empty cluster ==")
        print(report.probe_table(probe, args.probe_context))

    sweep: dict[int, dict[str, SimResult]] = {}
    if args.sweep:
        print(f"\n== scaling sweep: requests static can serve, load per instance as at {spec.num_instances} ==")
        for n in args.sweep:
            n_spec = _spec(args, n)
            scale = n / spec.num_instances
            n_trace = fits_one_instance(
                build_trace(args.workload, max(1, round(num_requests * scale)), args.request_rate * scale, args.seed),
                n_spec,
            )
            n_sched = scheduler_config(n_spec, args.max_seqs_per_instance, args.max_batched_tokens_per_instance,
                                       len(n_trace))
            sweep[n] = run_policies(n_spec, n_trace, n_sched, policies, mig, interval)
        print(report.sweep_table(sweep))

    claims = report.check_claims(full, common, probe, args.probe_context, cluster_label)
    print("\n== the paper's claims, in kind ==")
    print(report.claims_text(claims))
    print(
        "\nmodel: roofline PerfModel from datasheet numbers; lockstep steps (max over instances); "
        "DistAttention messages not overlapped with compute, block migrations copied in the background; "
        "see infinite_llm/sim/executor.py"
    )

    out = Path(args.output_dir)
    payload: dict[str, Any] = {
        "config": {
            "cluster": asdict(spec),
            "blocks_per_instance": spec.blocks_per_instance,
            "kv_tokens_per_instance": spec.blocks_per_instance * spec.block_size,
            "scheduler": asdict(sched),
            "workload": args.workload,
            "num_requests": len(trace),
            "request_rate": args.request_rate,
            "seed": args.seed,
            "migration_tokens_per_step": mig,
            "rebalance_interval_steps": interval,
            "probe_context": args.probe_context,
            "quick": bool(args.quick),
        },
        "full_trace": {p: r.summary() for p, r in full.items()},
        "static_servable": {p: r.summary() for p, r in common.items()},
        "probe": {p: r.summary() for p, r in probe.items()},
        "sweep": {str(n): {p: r.summary() for p, r in rs.items()} for n, rs in sweep.items()},
        "claims": claims,
        "wall_time_s": time.perf_counter() - started,
    }
    json_path = report.write_json(out / "simulate.json", payload)
    plots: list[str] = []
    if not args.no_plots:
        title = f"{cluster_label}, {args.workload} trace"
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


__all__ = ["add_cli_args", "main_from_args", "build_trace", "fits_one_instance", "run_policies"]
