"""Validate the cluster simulator against the local engine on this machine, side by side.

    python benchmarks/bench_sim_validation.py [--instances 4] [--kv-blocks-per-instance 64]
                                              [--num-requests 24] [--trials 3]

1. Profile: one instance's model runner times synthetic steps of varied batch size, chunk and
   context (infinite_llm.bench.profile) and a `PerfModel` is fitted to them.
2. Calibrate the host: the engine's instances are threads of one process on this machine's
   cores, talking through in-process queues. k = 1..N instances each decoding the same small
   batch give the engine loop's overhead per step (beyond the profiled runner) and how much a
   step stretches while k instances are busy; one request striped over two instances gives the
   cost of one per-layer query/partial exchange, and small batches striped over all instances how
   much the exchanges with several holders add up. The simulator charges all of them.
3. Measure: `LLM(...).generate(prompts, SamplingParams(...))` per placement policy on a batch of
   the local mixed workload, all submitted at once (offline). Two batches: the full one (static
   refuses what does not fit one instance, so it runs only the second) and the requests that fit
   one instance ("common"). Every batch runs `--trials` times per policy, policies interleaved,
   and the median trial is kept: other load on a small shared machine moves single runs.
4. Simulate the same batches with the simulator configured like the engine (instances, blocks,
   block size, scheduler, heartbeat / rebalance periods, migration rate), priced by the fitted
   model and the calibrated host (`host_stretch`, `step_overhead_s`, message latency).
5. Print measured and simulated throughput per policy and batch, and whether each agrees within
   25%, then the same for the ratios infinite/static and infinite/striped.

The engine rebalances with the same fitted model (a temporary perf model file), so both sides
decide migrations on the same numbers.
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
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.bench.profile import collect_samples, make_grid, set_cpu_threads
from infinite_llm.bench.workloads import TraceRequest, make_trace, paper_workloads
from infinite_llm.config import (
    CacheConfig,
    ClusterConfig,
    EngineConfig,
    SchedulerConfig,
)
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.sampling import SamplingParams
from infinite_llm.sim.cluster import StepCostModel
from infinite_llm.sim.simulator import SimSetup, simulate

POLICIES = ("static", "striped", "infinite")
AGREEMENT = 0.25


# ---------------------------------------------------------------------------- engine side
def engine_config(args: argparse.Namespace, placement: str, perf_path: Optional[str],
                  instances: Optional[int] = None) -> EngineConfig:
    return EngineConfig(
        model="default",
        cache=CacheConfig(block_size=args.block_size, num_blocks_per_instance=args.kv_blocks_per_instance),
        cluster=ClusterConfig(num_instances=instances or args.instances, backend="local", placement=placement,
                              migration_tokens_per_step=args.migration_tokens_per_step,
                              perf_model_path=perf_path),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        seed=args.seed,
    )


@dataclass
class Measured:
    tokens: int  # prompt + generated tokens of the batch
    elapsed_s: float
    decode_tokens_per_s: float  # mean over requests of their generation speed after the first token
    num_steps: int = 0  # batches run, all instances together
    migrated_blocks: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s


def generate(config: EngineConfig, trace: Sequence[TraceRequest], seed: int) -> Measured:
    """One offline batch through `LLM.generate`, timed after a warm-up request."""
    from infinite_llm.engine import LLM

    llm = LLM(config=copy.deepcopy(config))
    try:
        vocab = llm.engine.model_config.vocab_size
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
        prompts = [[(seed + 7 * i + j) % (vocab - 1) + 1 for j in range(r.prompt_len)] for i, r in enumerate(trace)]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in trace]
        before = llm.engine.stats()
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        time.sleep(3 * config.cluster.heartbeat_interval_s + 0.1)  # the last heartbeats carry the final counts
        after = llm.engine.stats()
    finally:
        llm.shutdown()
    tokens = sum(len(o.prompt_token_ids) + len(o.output_token_ids) for o in outputs)
    speeds = [(len(o.output_token_ids) - 1) / (o.finished_time - o.first_token_time) for o in outputs
              if o.finished_time and o.first_token_time and o.finished_time > o.first_token_time]
    return Measured(tokens, elapsed, statistics.fmean(speeds) if speeds else 0.0,
                    num_steps=after.num_steps - before.num_steps,
                    migrated_blocks=after.num_migrated_blocks - before.num_migrated_blocks)


def fit_perf_model(args: argparse.Namespace) -> tuple[PerfModel, float]:
    grid = make_grid(batch_sizes=(1, 4, 16), context_lens=(64, 512, 2048), prefill_chunks=(32, 128),
                     max_tokens_per_step=args.max_num_batched_tokens)
    started = time.perf_counter()
    samples = collect_samples(engine_config(args, "static", None, instances=1), grid, warmup=1, repeats=args.repeats)
    return PerfModel.fit(samples, source="bench_sim_validation"), time.perf_counter() - started


def decode_step_s(config: EngineConfig, trace: Sequence[TraceRequest], args: argparse.Namespace) -> float:
    """Median over trials of the engine's step time while the batch decodes (1 / tokens/s)."""
    return statistics.median(1.0 / generate(config, trace, args.seed).decode_tokens_per_s for _ in range(args.trials))


def calibrate_host(args: argparse.Namespace, perf: PerfModel) -> tuple[tuple[float, ...], float]:
    """How the instance threads share this machine: k = 1..N instances (static), each decoding
    the same 4 requests. The profile times only the model runner, so the one-instance step minus
    its priced time is the engine loop's own overhead; t(k) / t(1) is the stretch when k
    instances are busy (cores, the interpreter lock, the front end's thread)."""
    per_instance = [TraceRequest(f"host-{i}", 0.0, 160, 64) for i in range(4)]
    times = []
    for k in range(1, args.instances + 1):
        trace = [replace(r, request_id=f"{r.request_id}-{j}") for j in range(k) for r in per_instance]
        times.append(decode_step_s(engine_config(args, "static", None, instances=k), trace, args))
    alone = simulate(sim_setup(args, engine_config(args, "static", None, instances=1),
                               cost_model(perf, Links(0.0, 0.0)), perf), per_instance)
    priced = statistics.fmean((r.finished_s - r.first_token_s) / (r.output_len - 1) for r in alone.records)
    overhead = max(0.0, times[0] - priced)
    # More busy instances cannot make a step faster: a dip is measurement noise.
    stretch = tuple(max(t / times[0] for t in times[:k + 1]) for k in range(len(times)))
    print("host calibration: decode step with k instances busy: " + ", ".join(
        f"{k + 1}: {t * 1e3:.1f} ms" for k, t in enumerate(times))
        + f"; priced {priced * 1e3:.1f} ms -> loop overhead {overhead * 1e3:.1f} ms per step, stretch "
        + ", ".join(f"{x:.2f}" for x in stretch))
    return stretch, overhead


@dataclass
class Links:
    latency_s: float  # one per-layer message
    serial_fraction: float  # how much of the other holders' exchanges adds to the slowest one's
    control_s: float = 0.0  # one small control message (borrow, grant)


def control_latency() -> float:
    """Half the median round trip of a small message between two threads over the in-process
    transport the engine's instances use (what a borrow or a creditor query costs)."""
    import threading

    from infinite_llm.transport.local import LocalFabric

    fabric = LocalFabric()
    ping, pong = fabric.endpoint("ping"), fabric.endpoint("pong")

    def echo() -> None:
        while (message := pong.recv(timeout=5.0)) not in (None, "stop"):
            pong.send("ping", message)

    thread = threading.Thread(target=echo)
    thread.start()
    times = []
    for i in range(2000):
        started = time.perf_counter()
        ping.send("pong", i)
        ping.recv(timeout=5.0)
        times.append(time.perf_counter() - started)
    ping.send("pong", "stop")
    thread.join()
    return statistics.median(times) / 2


def _priced_decode_step(args: argparse.Namespace, perf: PerfModel, host: tuple[tuple[float, ...], float],
                        links: Links, instances: int, trace: list[TraceRequest]) -> float:
    """The simulator's mean step time while the requests of `trace` decode, striped."""
    cost = cost_model(perf, links, *host)
    result = simulate(sim_setup(args, engine_config(args, "striped", None, instances=instances), cost, perf), trace)
    return statistics.fmean((r.finished_s - r.first_token_s) / (r.output_len - 1) for r in result.records)


def calibrate_links(args: argparse.Namespace, perf: PerfModel, host: tuple[tuple[float, ...], float]) -> Links:
    """One request decoding striped over 2 instances (one holder, the other instance idle): the
    step, minus what the simulator prices without message costs, spread over its 2 x layers
    messages, is one message's latency. Then every one of the N instances decodes 4 requests,
    striped (each a home with N - 1 holders and a holder for everyone else): where that step
    falls between "slowest holder only" and "all holders one after another" is the serial
    fraction."""
    prompt = min(args.kv_blocks_per_instance * args.block_size // 8, 160)
    lone = [TraceRequest("calibrate", 0.0, prompt, 48)]
    layers = model_shape()[3]
    two = decode_step_s(engine_config(args, "striped", None, instances=2), lone, args)
    free = _priced_decode_step(args, perf, host, Links(0.0, 0.0), 2, lone)
    latency = max(0.0, two - free) / (2 * layers)
    n = args.instances
    busy = [TraceRequest(f"calibrate-{i}", 0.0, prompt, 48) for i in range(4 * n)]
    measured = decode_step_s(engine_config(args, "striped", None, instances=n), busy, args)
    parallel = _priced_decode_step(args, perf, host, Links(latency, 0.0), n, busy)
    serial = _priced_decode_step(args, perf, host, Links(latency, 1.0), n, busy)
    fraction = min(1.0, max(0.0, (measured - parallel) / (serial - parallel))) if serial > parallel else 0.0
    control = control_latency()
    print(f"link calibration: one request striped over 2, decode step {two * 1e3:.1f} ms ({free * 1e3:.1f} ms priced "
          f"without messages) -> {latency * 1e6:.0f} us per message; {4 * n} requests striped over {n}, "
          f"{measured * 1e3:.1f} ms (priced {parallel * 1e3:.1f} ms with holders in parallel, {serial * 1e3:.1f} ms "
          f"in series) -> serial fraction {fraction:.2f}; control messages {control * 1e6:.0f} us")
    return Links(latency, fraction, control)


def model_shape() -> tuple[int, int, int, int]:
    """(kv bytes per token, query bytes per token, partial bytes per token, layers) of the model."""
    from infinite_llm.model.loader import load_model_config, resolve_model_path

    mc = load_model_config(resolve_model_path("default"))
    dtype_bytes = 4  # the engine runs float32 on CPU
    query = mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * dtype_bytes
    partial = query + mc.num_hidden_layers * mc.num_attention_heads * 4
    return mc.kv_bytes_per_token(dtype_bytes), query, partial, mc.num_hidden_layers


# ---------------------------------------------------------------------------- simulator side
def sim_setup(args: argparse.Namespace, config: EngineConfig, cost: StepCostModel, perf: PerfModel) -> SimSetup:
    """The simulator configured like the engine `config` describes."""
    from infinite_llm.cluster.local import copy_s_per_block
    from infinite_llm.control.rebalancer import RebalancerConfig
    from infinite_llm.model.loader import load_model_config, resolve_model_path

    cluster, cache = config.cluster, config.cache
    model_config = load_model_config(resolve_model_path("default"))
    rebalancer = RebalancerConfig(block_size=cache.block_size, copy_s_per_block=copy_s_per_block(config, model_config),
                                  horizon_s=cluster.rebalance_interval_s)
    return SimSetup(
        cost=cost, num_instances=cluster.num_instances, num_blocks_per_instance=cache.num_blocks_per_instance,
        block_size=cache.block_size, placement=cluster.placement, scheduler=copy.deepcopy(config.scheduler),
        lend_fraction=cache.lend_fraction, heartbeat_interval_s=cluster.heartbeat_interval_s,
        rebalance_interval_s=cluster.rebalance_interval_s, migration_tokens_per_step=cluster.migration_tokens_per_step,
        rebalancer_perf=perf, rebalancer=rebalancer,
    )


def cost_model(perf: PerfModel, links: Links, stretch: Optional[tuple[float, ...]] = None,
               overhead: float = 0.0) -> StepCostModel:
    """The local engine as the simulator prices it: the fitted model, in-process links (latency
    only: a queue hand-off), and the measured host sharing and loop overhead."""
    kv_bytes, query_bytes, partial_bytes, layers = model_shape()
    return StepCostModel(
        perf=perf, kv_bytes_per_token=kv_bytes, query_bytes_per_token=query_bytes,
        partial_bytes_per_token=partial_bytes, num_layers=layers, intra_node_latency_s=links.latency_s,
        inter_node_latency_s=links.latency_s, instances_per_node=1 << 20, host_stretch=stretch,
        step_overhead_s=overhead, holders_serial_fraction=links.serial_fraction, control_latency_s=links.control_s,
    )


# ---------------------------------------------------------------------------- comparison
def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def agrees(simulated: float, measured: float) -> bool:
    return abs(ratio(simulated, measured) - 1.0) <= AGREEMENT


def run_batches(args: argparse.Namespace, batches: dict[str, list[TraceRequest]], perf_path: str,
                cost: StepCostModel, perf: PerfModel) -> tuple[dict, dict]:
    """Measured (median of interleaved trials) and simulated throughput per (batch, policy)."""
    runs = [(batch, policy) for batch in batches for policy in POLICIES if batch == "common" or policy != "static"]
    trials: dict[tuple[str, str], list[Measured]] = {run: [] for run in runs}
    for _ in range(args.trials):
        for batch, policy in runs:
            trials[(batch, policy)].append(generate(engine_config(args, policy, perf_path), batches[batch], args.seed))
    measured = {run: sorted(ms, key=lambda m: m.tokens_per_s)[len(ms) // 2] for run, ms in trials.items()}
    simulated = {}
    for batch, policy in runs:
        setup = sim_setup(args, engine_config(args, policy, perf_path), cost, perf)
        simulated[(batch, policy)] = simulate(setup, batches[batch])
    for run, ms in trials.items():
        print(f"  measured {run[0]}/{run[1]} over {len(ms)} trials: "
              + ", ".join(f"{m.tokens_per_s:.0f}" for m in sorted(ms, key=lambda m: m.tokens_per_s)) + " tok/s")
    return measured, simulated


def report(measured: dict, simulated: dict) -> bool:
    print(f"\n{'batch':<7} {'policy':<9} {'measured tok/s':>14} {'simulated tok/s':>15} {'sim/meas':>8} "
          f"{'steps m/s':>11} {'migrated m/s':>12}")
    ok = True
    for (batch, policy), m in measured.items():
        s = simulated[(batch, policy)]
        good = agrees(s.throughput_tokens_per_s, m.tokens_per_s)
        ok &= good
        print(f"{batch:<7} {policy:<9} {m.tokens_per_s:>14.0f} {s.throughput_tokens_per_s:>15.0f} "
              f"{ratio(s.throughput_tokens_per_s, m.tokens_per_s):>8.2f} {f'{m.num_steps}/{s.num_steps}':>11} "
              f"{f'{m.migrated_blocks}/{s.migrated_blocks}':>12}"
              f"  {'agree' if good else 'DISAGREE'}")
    print("\nratios (prompt + generated tokens per second):")
    for batch, base in (("common", "static"), ("common", "striped"), ("full", "striped")):
        if (batch, base) not in measured:
            continue
        m_ratio = ratio(measured[(batch, "infinite")].tokens_per_s, measured[(batch, base)].tokens_per_s)
        s_ratio = ratio(simulated[(batch, "infinite")].throughput_tokens_per_s,
                        simulated[(batch, base)].throughput_tokens_per_s)
        good = agrees(s_ratio, m_ratio)
        ok &= good
        print(f"  {batch:<7} infinite/{base:<8} measured {m_ratio:.2f}x  simulated {s_ratio:.2f}x  "
              f"-> {'agree' if good else 'DISAGREE'} within {AGREEMENT:.0%}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--kv-blocks-per-instance", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--migration-tokens-per-step", type=int, default=64)
    parser.add_argument("--workload", choices=("short", "long", "mixed"), default="mixed")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per profiled step shape")
    parser.add_argument("--trials", type=int, default=3, help="engine runs per policy and batch (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for profiling (the local engine gives each instance "
                             "thread cores / instances)")
    args = parser.parse_args()
    started = time.perf_counter()
    set_cpu_threads(args.torch_threads, "cpu")

    perf, profile_s = fit_perf_model(args)
    print(f"fitted on this machine in {profile_s:.1f} s: t_fixed {perf.t_fixed * 1e3:.3f} ms, "
          f"t_per_token {perf.t_per_token * 1e6:.2f} us, t_per_seq {perf.t_per_seq * 1e6:.2f} us, "
          f"t_per_kv_token {perf.t_per_kv_token * 1e9:.2f} ns (relative RMSE {perf.fit_relative_rmse:.1%})")
    host = calibrate_host(args, perf)
    links = calibrate_links(args, perf, host)
    spec = replace(paper_workloads("local")[args.workload], num_requests=args.num_requests, request_rate=float("inf"),
                   seed=args.seed)
    full = make_trace(spec)
    capacity = args.kv_blocks_per_instance * args.block_size
    common = [r for r in full if r.prompt_len + r.output_len <= capacity]
    print(f"batch: {len(full)} {args.workload} requests submitted at once, prompts "
          f"{min(r.prompt_len for r in full)}-{max(r.prompt_len for r in full)} tokens; {args.instances} instances x "
          f"{capacity} KV tokens; {len(full) - len(common)} requests exceed one instance")
    with tempfile.TemporaryDirectory() as tmp:
        perf_path = os.path.join(tmp, "perf_model.json")
        perf.save(perf_path)
        measured, simulated = run_batches(args, {"full": full, "common": common}, perf_path,
                                          cost_model(perf, links, *host), perf)
    ok = report(measured, simulated)
    print(f"\n{'all agree' if ok else 'some disagree'} within {AGREEMENT:.0%}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
