"""Validate the cluster simulator against the real engine on this machine, side by side.

    python benchmarks/bench_sim_validation.py [--instances 4] [--kv-blocks-per-instance 64]
                                              [--num-requests 24] [--request-rate 4]

1. Profile: the real engine's executor times synthetic steps of varied batch size, chunk and
   context (infinite_llm.bench.profile) and a `PerfModel` is fitted to them.
2. Measure: one small mixed trace (paper_workloads("local")) is replayed through the real engine
   (LLMEngine, built-in default model, local backend, small KV pools so long requests do not fit
   one instance) once per placement policy (infinite_llm.bench.offline.run_policy).
3. Simulate: the same trace through the simulator, configured like the engine (same instances,
   blocks, block size, scheduler and migration settings), priced by the fitted model. The
   engine's instances are threads sharing this machine's cores ("shared_host"), and
   the control plane's own host time is charged to the clock as it is in the engine. How the
   instance threads share the cores and what one per-layer exchange costs (host work, and a
   wait that other instances' threads fill) are measured on a local engine of the same size
   (`profile_instances`).
4. Print measured and simulated throughput ratios infinite/static and infinite/striped, and
   whether each pair agrees within 25%. The engine replay runs `--trials` times per policy
   (interleaved; the median trial is kept): other load on a small shared machine moves single
   runs by tens of percent.
5. Instance model on identical plans: every StepPlan the simulator made for each policy is
   executed on a local engine and timed; the ratios of (tokens / executed time) between policies
   are compared with the simulator's (tokens / priced time). The end-to-end replay of step 2
   also differs in arrival timing and hence in rebalancing decisions; this check does not.

The engine rebalances with the same fitted model (written to a temporary perf model file), so
both sides make their migration decisions on the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.bench.offline import run_policy  # noqa: E402
from infinite_llm.bench.profile import (  # noqa: E402
    GridPoint,
    build_plan,
    collect_samples,
    make_grid,
    set_cpu_threads,
    time_step,
)
from infinite_llm.bench.workloads import make_trace, paper_workloads  # noqa: E402
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.control.perf_model import PerfModel  # noqa: E402
from infinite_llm.control.plan import BlockRef, StepPlan  # noqa: E402
from infinite_llm.sim.cluster import StepCostModel  # noqa: E402
from infinite_llm.sim.simulator import SimSetup, simulate  # noqa: E402

POLICIES = ("static", "striped", "infinite")
AGREEMENT = 0.25


def engine_config(args: argparse.Namespace, placement: str, perf_path: str | None) -> EngineConfig:
    return EngineConfig(
        model="default",
        cache=CacheConfig(block_size=args.block_size, num_blocks_per_instance=args.kv_blocks_per_instance),
        cluster=ClusterConfig(num_instances=args.instances, backend="local", placement=placement,
                              rebalance_interval_steps=args.rebalance_interval,
                              migration_tokens_per_step=args.migration_tokens_per_step,
                              perf_model_path=perf_path),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        seed=args.seed,
    )


def fit_perf_model(args: argparse.Namespace) -> tuple[PerfModel, float]:
    grid = make_grid(batch_sizes=(1, 4, 16), context_lens=(64, 512, 2048), prefill_chunks=(32, 128),
                     max_tokens_per_step=args.max_num_batched_tokens)
    started = time.perf_counter()
    samples = collect_samples(engine_config(args, "static", None), grid, warmup=1, repeats=args.repeats)
    model = PerfModel.fit(samples, source="bench_sim_validation")
    return model, time.perf_counter() - started


@dataclass
class HostProfile:
    lanes: float  # instances' work the host runs at once
    contention: float  # stretch per busy instance beyond the cores
    cores: int
    latency_s: float  # wait for one per-layer query/partial message from a peer
    message_cpu_s: float  # host work one such message costs its instance
    guest_segment_cpu_s: float  # host work per guest sequence an instance attends for


def profile_instances(args: argparse.Namespace, num_layers: int) -> HostProfile:
    """Measure on a local engine of --instances instances how the instance threads share this
    machine and what one per-layer exchange costs.

    k = 1..N instances each run the same small decode batch in one step: t(2) / (2 t(1)) gives
    the lanes, and the growth of t(k) / (k t(1)) past the core count the contention. A message
    costs its instance some CPU work (c, shared with the other instances' threads) and a wait
    (w, which the other threads fill with their work):
    - "ring": all N instances busy, each with half its blocks on the next instance, so every
      instance exchanges with 2 peers (1 if N = 2) and hosts its predecessor's b sequences; the
      host is saturated and the waits are hidden:
      t_ring(b) - t(N, b) = contention * N * (2 layers * peers * c + b * g) / lanes,
      measured at two batch sizes b to separate c from the per-guest-sequence work g;
    - "split": one batch with half its blocks on instance 1, nobody else busy, so the wait is
      not hidden: t_split - t(1) = 2 layers * (c + w).
    """
    from infinite_llm.engine import LLMEngine

    point = GridPoint(batch_size=4, chunk=1, context_len=512)
    big = replace(point, batch_size=12)
    n = max(2, args.instances)
    bs = args.block_size
    config = engine_config(args, "static", None)
    config.cluster.num_instances = n
    config.cache.num_blocks_per_instance = big.batch_size * big.context_len // bs
    engine = LLMEngine(config)

    def half_remote(plan: StepPlan, instance_of_rest) -> StepPlan:
        for work in plan.seqs:
            half = len(work.block_table) // 2
            work.block_table = work.block_table[:half] + [
                BlockRef(instance_of_rest(work.home), r.block) for r in work.block_table[half:]]
        return plan

    def busy(k: int, shape: GridPoint) -> StepPlan:
        seqs = []
        for i in range(k):
            for work in build_plan(shape, bs, step_id=k, instance=i).seqs:
                work.request_id += f"-{i}"
                seqs.append(work)
        return StepPlan(step_id=k, block_size=bs, seqs=seqs)

    try:
        plans: dict[str, StepPlan] = {f"k{k}": busy(k, point) for k in range(1, n + 1)}
        plans["kbig"] = busy(n, big)
        # The second half of instance i's blocks reuse instance i+1's block ids past its own
        # batch's half: the blocks are distinct, as in the all-local plans.
        plans["ring"] = half_remote(busy(n, point), lambda home: (home + 1) % n)
        plans["ringbig"] = half_remote(busy(n, big), lambda home: (home + 1) % n)
        plans["split"] = half_remote(build_plan(point, bs, step_id=n + 1, instance=0), lambda home: 1)
        for plan in plans.values():  # warm up
            engine.executor.execute(plan)
        # Interleaved rounds: load from other processes hits every shape alike, and medians
        # of per-round ratios ignore the rounds it hit hardest.
        rounds: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(args.repeats + 10):
            for name, plan in plans.items():
                rounds[name].append(time_step(engine.executor.execute, plan, warmup=0, repeats=1))
    finally:
        engine.shutdown()
    cores = os.cpu_count() or 1
    one = rounds["k1"]
    stretch = {k: statistics.median(t / (k * t1) for t, t1 in zip(rounds[f"k{k}"], one)) for k in range(1, n + 1)}
    lanes = min(float(cores), max(1.0, 1.0 / stretch[2]))
    extra = [(stretch[k] * lanes - 1.0) / (k - cores) for k in range(cores + 1, n + 1)]
    contention = max(0.0, statistics.median(extra)) if extra else 0.0
    peers = 2 if n >= 3 else 1
    ring_messages = n * 2 * num_layers * peers
    stretch_n = 1.0 + contention * max(0, n - cores)
    work_small = statistics.median(r - k for r, k in zip(rounds["ring"], rounds[f"k{n}"])) * lanes / stretch_n
    work_big = statistics.median(r - k for r, k in zip(rounds["ringbig"], rounds["kbig"])) * lanes / stretch_n
    guest_cpu = max(0.0, (work_big - work_small) / (n * (big.batch_size - point.batch_size)))
    message_cpu = max(0.0, work_small - n * point.batch_size * guest_cpu) / ring_messages
    split_extra = statistics.median(sp - t1 for sp, t1 in zip(rounds["split"], one))
    latency = max(0.0, split_extra / (2 * num_layers) - message_cpu)
    print("instances busy in one step: " + ", ".join(
        f"{k}: {statistics.median(rounds[f'k{k}']) * 1e3:.1f} ms" for k in range(1, n + 1))
        + f" -> lanes {lanes:.2f}, contention {contention:.2f} per instance past {cores} cores")
    print(f"half the KV remote: all {n} busy (ring) {statistics.median(rounds['ring']) * 1e3:.1f} ms at batch "
          f"{point.batch_size}, {statistics.median(rounds['ringbig']) * 1e3:.1f} ms at {big.batch_size} -> host work "
          f"{message_cpu * 1e6:.0f} us per message + {guest_cpu * 1e6:.0f} us per guest sequence; "
          f"one batch (split) {statistics.median(rounds['split']) * 1e3:.1f} ms -> {latency * 1e6:.0f} us wait per message")
    return HostProfile(lanes=lanes, contention=contention, cores=cores, latency_s=latency,
                       message_cpu_s=message_cpu, guest_segment_cpu_s=guest_cpu)


@dataclass
class PlanReplay:
    """The simulator's own step plans for one policy, priced and executed on the local engine."""

    tokens: int  # prompt + generated tokens the plans compute
    priced_s: float
    executed_s: float


def replay_sim_plans(args: argparse.Namespace, setups: dict[str, SimSetup], trace) -> dict[str, PlanReplay]:
    """Run the simulator per policy, recording every StepPlan with its priced time, then execute
    the same plans on one local engine (block copies waited for, as the next step would), rounds
    of all policies interleaved. Same control decisions on both sides: only the model of an
    instance step differs, without the end-to-end replay's arrival-timing and rebalancing drift."""
    from infinite_llm.engine import LLMEngine
    from infinite_llm.sim.simulator import Simulator

    recorded: dict[str, list[tuple[StepPlan, float]]] = {}
    for policy, setup in setups.items():
        sim = Simulator(setup)
        steps: list[tuple[StepPlan, float]] = []
        price = sim.executor.execute

        def record(plan: StepPlan, price=price, sim=sim, steps=steps):
            results = price(plan)
            steps.append((copy.deepcopy(plan), sim.executor.last_timing.step_time_s))
            return results

        sim.executor.execute = record
        sim.run(trace)
        recorded[policy] = steps
    engine = LLMEngine(engine_config(args, "static", None))
    replays = {p: PlanReplay(tokens=sum(len(w.token_ids) for plan, _ in steps for w in plan.seqs),
                             priced_s=sum(t for _, t in steps), executed_s=0.0)
               for p, steps in recorded.items()}
    try:
        workers = engine.executor.workers
        longest = max(len(steps) for steps in recorded.values())
        for i in range(longest):  # step i of every policy, then step i + 1: drift hits all alike
            for policy, steps in recorded.items():
                if i < len(steps):
                    started = time.perf_counter()
                    engine.executor.execute(steps[i][0])
                    for worker in workers:
                        worker.copier.wait()
                    replays[policy].executed_s += time.perf_counter() - started
    finally:
        engine.shutdown()
    return replays


def model_shape(config: EngineConfig) -> tuple[int, int, int, int]:
    """(kv bytes per token, query bytes per token, partial bytes per token, layers) of the model."""
    from infinite_llm.model.loader import load_model_config, resolve_model_path

    mc = load_model_config(resolve_model_path(config.model))
    dtype_bytes = 4  # the engine runs float32 on CPU
    query = mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * dtype_bytes
    partial = query + mc.num_hidden_layers * mc.num_attention_heads * 4
    return mc.kv_bytes_per_token(dtype_bytes), query, partial, mc.num_hidden_layers


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--kv-blocks-per-instance", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--rebalance-interval", type=int, default=8)
    parser.add_argument("--migration-tokens-per-step", type=int, default=64)
    parser.add_argument("--workload", choices=("short", "long", "mixed"), default="mixed")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per profiled step shape")
    parser.add_argument("--trials", type=int, default=3, help="engine replays per policy (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); 1 keeps the instance threads "
                             "from oversubscribing a small CPU (see bench/profile.py)")
    args = parser.parse_args()
    started = time.perf_counter()
    set_cpu_threads(args.torch_threads, "cpu")

    perf, profile_s = fit_perf_model(args)
    print(f"fitted on this machine in {profile_s:.1f} s: t_fixed {perf.t_fixed * 1e3:.3f} ms, "
          f"t_per_token {perf.t_per_token * 1e6:.2f} us, t_per_seq {perf.t_per_seq * 1e6:.2f} us, "
          f"t_per_kv_token {perf.t_per_kv_token * 1e9:.2f} ns (relative RMSE {perf.fit_relative_rmse:.1%})")

    spec = replace(paper_workloads("local")[args.workload], num_requests=args.num_requests,
                   request_rate=args.request_rate, seed=args.seed)
    trace = make_trace(spec)
    capacity = args.kv_blocks_per_instance * args.block_size
    print(f"trace: {len(trace)} {args.workload} requests at {args.request_rate} req/s, prompts "
          f"{min(r.prompt_len for r in trace)}-{max(r.prompt_len for r in trace)} tokens; "
          f"{args.instances} instances x {capacity} KV tokens "
          f"({sum(r.prompt_len + r.output_len > capacity for r in trace)} requests exceed one instance)")

    with tempfile.TemporaryDirectory() as tmp:
        perf_path = os.path.join(tmp, "perf_model.json")
        perf.save(perf_path)
        kv_bytes, query_bytes, partial_bytes, layers = model_shape(engine_config(args, "static", None))
        host = profile_instances(args, layers)
        cost = StepCostModel(
            perf=perf, kv_bytes_per_token=kv_bytes, query_bytes_per_token=query_bytes,
            partial_bytes_per_token=partial_bytes, num_layers=layers,
            intra_node_latency_s=host.latency_s, inter_node_latency_s=host.latency_s,
            instances_per_node=args.instances, latency_per_peer=True, combine="shared_host",
            host_lanes=host.lanes, host_cores=host.cores, contention_per_extra_instance=host.contention,
            message_cpu_s=host.message_cpu_s, guest_segment_cpu_s=host.guest_segment_cpu_s,
        )
        # The engine replays in wall-clock time on a shared machine: repeat it, policies
        # interleaved, and keep each policy's median-throughput trial.
        trials: dict[str, list] = {policy: [] for policy in POLICIES}
        for _ in range(args.trials):
            for policy in POLICIES:
                config = engine_config(args, policy, perf_path)
                trials[policy].append(run_policy(copy.deepcopy(config), trace, seed=args.seed))
        measured = {
            policy: sorted(results, key=lambda r: r.total_tokens_per_s)[len(results) // 2]
            for policy, results in trials.items()
        }
        setups = {}
        for policy in POLICIES:
            config = engine_config(args, policy, perf_path)
            setups[policy] = SimSetup(
                cost=cost, num_instances=args.instances, num_blocks_per_instance=args.kv_blocks_per_instance,
                block_size=args.block_size, placement=policy, scheduler=copy.deepcopy(config.scheduler),
                lend_fraction=config.cache.lend_fraction, rebalance_interval_steps=args.rebalance_interval,
                migration_tokens_per_step=args.migration_tokens_per_step, charge_control_plane=True,
            )
        simulated = {policy: simulate(copy.deepcopy(setup), trace) for policy, setup in setups.items()}
        replays = replay_sim_plans(args, setups, trace)

    print(f"\n{'policy':<9} {'measured tok/s':>14} {'simulated tok/s':>15} {'sim/meas':>8} "
          f"{'done m/s':>9} {'steps m/s':>11} {'migrated m/s':>12}")
    for policy in POLICIES:
        m, s = measured[policy], simulated[policy]
        print(f"{policy:<9} {m.total_tokens_per_s:>14.1f} {s.throughput_tokens_per_s:>15.1f} "
              f"{ratio(s.throughput_tokens_per_s, m.total_tokens_per_s):>8.2f} "
              f"{f'{m.num_completed}/{s.num_completed}':>9} {f'{m.num_steps}/{s.num_steps}':>11} "
              f"{f'{m.migrated_blocks}/{s.migrated_blocks}':>12}")

    for policy in POLICIES:
        values = sorted(r.total_tokens_per_s for r in trials[policy])
        print(f"  measured {policy} over {len(values)} trials: " + ", ".join(f"{v:.1f}" for v in values) + " tok/s")
    print("\nthroughput ratios (prompt + generated tokens of completed requests per second):")
    all_agree = True
    for base in ("static", "striped"):
        m_ratio = ratio(measured["infinite"].total_tokens_per_s, measured[base].total_tokens_per_s)
        s_ratio = ratio(simulated["infinite"].throughput_tokens_per_s, simulated[base].throughput_tokens_per_s)
        agree = abs(s_ratio / m_ratio - 1.0) <= AGREEMENT
        all_agree &= agree
        print(f"  infinite/{base:<8} measured {m_ratio:.2f}x  simulated {s_ratio:.2f}x  "
              f"-> {'agree' if agree else 'DISAGREE'} within {AGREEMENT:.0%} (sim/measured {s_ratio / m_ratio:.2f})")
    print("\ninstance model on identical plans (the simulator's step plans, executed on the local engine):")
    for policy in POLICIES:
        r = replays[policy]
        print(f"  {policy:<9} {r.tokens} tokens: priced {r.priced_s:.2f} s, executed {r.executed_s:.2f} s "
              f"(priced/executed {r.priced_s / r.executed_s:.2f})")
    plans_agree = True
    for base in ("static", "striped"):
        executed = ratio(replays["infinite"].tokens / replays["infinite"].executed_s,
                         replays[base].tokens / replays[base].executed_s)
        priced = ratio(replays["infinite"].tokens / replays["infinite"].priced_s,
                       replays[base].tokens / replays[base].priced_s)
        agree = abs(priced / executed - 1.0) <= AGREEMENT
        plans_agree &= agree
        print(f"  infinite/{base:<8} executed {executed:.2f}x  priced {priced:.2f}x  "
              f"-> {'agree' if agree else 'DISAGREE'} within {AGREEMENT:.0%} (priced/executed {priced / executed:.2f})")
    print(f"\nend to end: {'all ratios agree' if all_agree else 'some ratios disagree'}; "
          f"identical plans: {'all ratios agree' if plans_agree else 'some ratios disagree'}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
