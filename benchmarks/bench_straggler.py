"""Straggler isolation: requests homed on instances 0 and 1 of a 3-instance cluster keep their
throughput while instance 2 is slowed down, measured side by side in one run.

    python benchmarks/bench_straggler.py [--delay 0.2] [--repeats 3] [--placement infinite]

Two engines of 3 instances each (local backend, same model and budgets, enough KV blocks that
nothing borrows): "undisturbed", and "straggler" where instance 2 sleeps --delay seconds in
every step (`ClusterConfig.debug_step_delay_s`, a test hook). Each round sends the same batch to
both (alternating which goes first): --per-instance requests pinned to each of instances 0, 1
and 2. Measured: generated tokens/s of the requests on instances 0 and 1 (their tokens over the
time the last of them finished). Printed: straggler / undisturbed, goal >= 0.8 (under the old
lockstep engine every step of every instance waited for the slow one), and straggler / "instance
2 idle" (the undisturbed engine with no requests on instance 2), a stricter reference on a box
where the instances share CPU cores: a straggler that sleeps frees CPU. Also printed: the blocks
instances 0 and 1 ever borrowed and the blocks migrated, which must be 0 for the comparison to
mean isolation of compute, not of memory.

Pinning: `LLMEngine.add_request(..., home=i)`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.engine import LLMEngine  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402

FAST = (0, 1)
SLOW = 2


def make_engine(args: argparse.Namespace, delay_s: float) -> LLMEngine:
    per_request = -(-(args.prompt_len + args.output_len) // 16) + 1
    return LLMEngine(EngineConfig(
        model=args.model,
        # Every instance holds all its requests at home with room to spare: nothing borrows.
        cache=CacheConfig(block_size=16, num_blocks_per_instance=4 * args.per_instance * per_request),
        cluster=ClusterConfig(num_instances=3, placement=args.placement,
                              debug_step_delay_s={SLOW: delay_s} if delay_s else None),
        scheduler=SchedulerConfig(max_num_seqs=max(8, args.per_instance), max_num_batched_tokens=512),
    ))


@dataclass
class Round:
    fast_tokens_per_s: float  # requests on instances 0 and 1
    max_borrowed_fast: int  # most blocks instances 0/1 held on other instances (heartbeat view)
    max_lent_by_slow: int


def run_round(engine: LLMEngine, args: argparse.Namespace, tag: str, slow_work: bool = True) -> Round:
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    homes = {}
    for home in (*FAST, SLOW) if slow_work else FAST:
        for k in range(args.per_instance):
            rid = f"{tag}-{home}-{k}"
            prompt = [3 + (7 * k + 11 * home + i) % 200 for i in range(args.prompt_len)]
            engine.add_request(rid, prompt, params, home=home)
            homes[rid] = home
    start = time.perf_counter()
    finished: dict[str, float] = {}
    tokens: dict[str, int] = {}
    borrowed = lent = 0
    # Only the fast instances' requests are waited for; the slow ones are aborted after.
    while any(homes[r] in FAST and r not in finished for r in homes):
        for out in engine.step(timeout_s=0.05):
            assert out.error is None, out.error
            tokens[out.request_id] = len(out.output_token_ids)
            if out.finished:
                finished[out.request_id] = time.perf_counter() - start
        stats = engine.stats().per_instance
        borrowed = max([borrowed] + [row["blocks_borrowed"] for row in stats if row["instance"] in FAST])
        lent = max([lent] + [row["blocks_lent"] for row in stats if row["instance"] == SLOW])
    fast = [r for r in homes if homes[r] in FAST]
    span = max(finished[r] for r in fast)
    for rid in homes:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step(timeout_s=0.05)
    return Round(sum(tokens[r] for r in fast) / span, borrowed, lent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--placement", choices=["static", "infinite"], default="infinite")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds instance 2 sleeps per step")
    parser.add_argument("--per-instance", type=int, default=4, help="requests pinned to each instance per round")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per engine, alternating")
    args = parser.parse_args()

    engines = {"undisturbed": make_engine(args, 0.0), "straggler": make_engine(args, args.delay)}
    # (name, engine, whether instance 2 gets requests). "2 idle" is a reference: on a small CPU
    # box the instances share the cores, so a slow instance that mostly sleeps frees CPU for
    # the others, and the undisturbed baseline (instance 2 computing too) is the harder one.
    variants = [("undisturbed", engines["undisturbed"], True), ("straggler", engines["straggler"], True),
                ("2 idle", engines["undisturbed"], False)]
    rounds: dict[str, list[Round]] = {name: [] for name, _, _ in variants}
    try:
        for name, engine in engines.items():  # warm-up round each, not counted
            run_round(engine, args, f"warm-{name}")
        for rnd in range(args.repeats):
            for name, engine, slow_work in variants if rnd % 2 == 0 else list(reversed(variants)):
                result = run_round(engine, args, f"{name.replace(' ', '')}-{rnd}", slow_work)
                rounds[name].append(result)
                print(f"  round {rnd} {name}: instances 0+1 {result.fast_tokens_per_s:.1f} generated tok/s")
        time.sleep(0.5)  # the counters travel by heartbeat, then the gManager's view
        migrated = {name: engine.stats().num_migrated_blocks for name, engine in engines.items()}
        migrated["2 idle"] = migrated["undisturbed"]
    finally:
        for engine in engines.values():
            engine.shutdown()

    med = {name: statistics.median(r.fast_tokens_per_s for r in rs) for name, rs in rounds.items()}
    print(f"3 instances ({args.placement}), instance {SLOW} sleeps {args.delay * 1e3:.0f} ms per step; "
          f"{args.per_instance} requests per instance, prompt {args.prompt_len}, output {args.output_len}")
    print(f"instances 0+1 generated tok/s (median of {args.repeats}): undisturbed {med['undisturbed']:.1f}, "
          f"with straggler {med['straggler']:.1f}, instance 2 idle (reference) {med['2 idle']:.1f}")
    for name, rs in rounds.items():
        print(f"  {name}: blocks borrowed by 0/1 (max) {max(r.max_borrowed_fast for r in rs)}, "
              f"lent by {SLOW} (max) {max(r.max_lent_by_slow for r in rs)}, migrated {migrated[name]}")
    print(f"ratio straggler/undisturbed = {med['straggler'] / med['undisturbed']:.2f} (goal >= 0.8)")
    print(f"ratio straggler/instance-2-idle = {med['straggler'] / med['2 idle']:.2f} "
          f"(stricter: no CPU freed by the sleeping straggler)")


if __name__ == "__main__":
    main()
