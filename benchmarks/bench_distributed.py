"""Distributed KV cache: the longest context N instances serve vs one instance, and decode latency
with a request's KV split over 2 instances vs all local, measured side by side in one run.

    python benchmarks/bench_distributed.py [--backend local|ray] [--blocks 64] [--instances 4]

1. For N = 1 and N = --instances, with the same per-instance budget, the largest request the
   cluster admits is actually run (prefill + a few decode steps); the ratio max_N / max_1 is
   printed against the goal 0.9 * N.
2. One request of --context tokens decodes with all its KV on its home instance, then with the
   home's budget cut so half of its blocks live on the other instance; the ratio of median decode
   step times is printed (the cost of query shipping + ScaleReduce).
3. (local backend) A decode step on 2 instances with --migrate-blocks block copies each way run
   in the background beside it, vs the same step alone and the copies alone (each timed until
   the copies are done). Printed: with-copies / alone, and with-copies / (alone + copies-alone),
   i.e. how much of the copy time the overlap hides (1.0 = none, serial).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.bench.profile import GridPoint, build_plan, time_step  # noqa: E402
from infinite_llm.control.plan import BlockMove, BlockRef, StepPlan  # noqa: E402
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.engine import LLMEngine  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402


def make_engine(args, instances: int, blocks: int, lend_fraction: float = 0.9,
                migration_tokens_per_step: int = 256) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=args.model,
            cache=CacheConfig(block_size=args.block_size, num_blocks_per_instance=blocks, lend_fraction=lend_fraction),
            cluster=ClusterConfig(num_instances=instances, backend=args.backend, placement="infinite",
                                  migration_tokens_per_step=migration_tokens_per_step),
            scheduler=SchedulerConfig(max_num_batched_tokens=args.chunk),
        )
    )


def serve_max_context(args, instances: int) -> tuple[int, float]:
    engine = make_engine(args, instances, args.blocks)
    try:
        capacity = engine.scheduler.max_context()
        decode = 4
        prompt = [3 + (i * 7) % 200 for i in range(capacity - decode)]
        engine.add_request("max", prompt, SamplingParams(temperature=0.0, max_tokens=decode, ignore_eos=True))
        t0 = time.perf_counter()
        done = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done = out
        assert done is not None and len(done.output_token_ids) == decode, "max-context request did not finish"
        return capacity, time.perf_counter() - t0
    finally:
        engine.shutdown()


def decode_latency(args, split: bool) -> float:
    bs = args.block_size
    need = -(-(args.context + args.decode_steps + 1) // bs)
    # Split: the home holds about half the blocks, the rest is borrowed from instance 1.
    blocks = need // 2 + 1 if split else need + 2
    engine = make_engine(args, 2, blocks, lend_fraction=1.0)
    try:
        prompt = [3 + (i * 11) % 200 for i in range(args.context)]
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=args.decode_steps, ignore_eos=True))
        while engine.scheduler.requests["r"].num_computed_tokens < args.context:
            engine.step()
        table = engine.kv.block_table("r")
        remote = sum(1 for ref in table if ref.instance != engine.scheduler.requests["r"].home)
        times = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        print(f"  {'split' if split else 'local'}: {len(table)} blocks, {remote} remote, "
              f"median decode step {statistics.median(times) * 1e3:.2f} ms")
        return statistics.median(times[1:] if len(times) > 2 else times)
    finally:
        engine.shutdown()


def migration_overlap(args) -> tuple[float, float, float]:
    """Median times of (decode step, the same step with --migrate-blocks block copies each way
    in the background, the copies alone), each until the copies are done, interleaved rounds."""
    bs = args.block_size
    point = GridPoint(batch_size=args.batch, chunk=1, context_len=args.context)
    used = args.batch * -(-args.context // bs)
    k = args.migrate_blocks
    engine = make_engine(args, 2, used + k)
    try:
        # A decode batch homed on each instance, all KV local: the copies change no placement.
        seqs = []
        for instance in (0, 1):
            for work in build_plan(point, bs, instance=instance).seqs:
                work.request_id += f"-{instance}"
                seqs.append(work)
        # Copies between blocks nobody reads this step (past the batch's blocks), both ways.
        moves = [BlockMove(BlockRef(src, used + i), BlockRef(1 - src, used + i)) for src in (0, 1) for i in range(k)]
        plans = {
            "decode": StepPlan(step_id=0, block_size=bs, seqs=seqs),
            "decode+copies": StepPlan(step_id=0, block_size=bs, seqs=seqs, migrations=moves),
            "copies": StepPlan(step_id=0, block_size=bs, migrations=moves),
        }
        workers = engine.executor.workers

        def run_and_finish_copies(plan: StepPlan) -> None:
            engine.executor.execute(plan)
            for worker in workers:
                worker.copier.wait()

        for plan in plans.values():
            run_and_finish_copies(plan)  # warm-up
        rounds: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(args.decode_steps):
            for name, plan in plans.items():
                rounds[name].append(time_step(run_and_finish_copies, plan, warmup=0, repeats=1))
        block_kib = engine.model_config.kv_bytes_per_token() * bs / 1024
        print(f"  batch {args.batch} per instance, {k} blocks ({block_kib:.0f} KiB each) copied each way per step")
        return tuple(statistics.median(rounds[name]) for name in plans)  # type: ignore[return-value]
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=48, help="KV blocks per instance")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per step)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--migrate-blocks", type=int, default=8, help="blocks copied each way per step in part 3")
    parser.add_argument("--batch", type=int, default=4, help="decode batch per instance in part 3")
    args = parser.parse_args()

    print(f"== max context served (budget {args.blocks} blocks x {args.block_size} tokens per instance, backend {args.backend})")
    one, t1 = serve_max_context(args, 1)
    many, tn = serve_max_context(args, args.instances)
    print(f"  1 instance: {one} tokens ({t1:.1f}s); {args.instances} instances: {many} tokens ({tn:.1f}s)")
    print(f"  ratio max_N/max_1 = {many / one:.2f} (goal >= {0.9 * args.instances:.2f} = 0.9*N)")

    print(f"== decode latency, context {args.context} tokens, 2 instances")
    local = decode_latency(args, split=False)
    split = decode_latency(args, split=True)
    print(f"  ratio split/local decode step time = {split / local:.2f}")

    if args.backend == "local":
        print(f"== decode while migrating, context {args.context} tokens, 2 instances, {args.decode_steps} rounds")
        plain, overlapped, copy_only = migration_overlap(args)
        print(f"  decode step {plain * 1e3:.2f} ms; with background copies {overlapped * 1e3:.2f} ms; "
              f"copy-only step {copy_only * 1e3:.2f} ms")
        print(f"  ratio with-migration/without = {overlapped / plain:.2f}; "
              f"overlapped/serial (step + copy-only) = {overlapped / (plain + copy_only):.2f}")


if __name__ == "__main__":
    main()
