"""Short requests during a long prefill: TTFT and inter-token gaps vs the same requests alone.

    python benchmarks/bench_long_prefill.py [--long 10000] [--delay 2.0] [--repeats 2]
        [--num-instances 2 --spanning-prefill-every 1|16]

One engine (default model, one instance). Per repeat, interleaved: (a) 4 short requests on an
idle engine; (b) a --long token prompt, then after --delay seconds the same 4 short requests.
Printed: median TTFT and median / p90 inter-token gap of the short requests in (b) over (a).
Goal (issue 11): both ratios <= 3.

With --num-instances 2 (in process), each instance's KV pool holds 60% of the long prompt: it
spans both instances (attention over the borrowed part runs on the other one). Every request is
homed on instance 0, so the short requests share their home with the long prompt's chunks, which
the scheduler runs in steps of their own except once every --spanning-prefill-every steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.engine import LLMEngine  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402


def run_shorts(engine: LLMEngine, tag: str, long_len: int, delay_s: float,
               home: Optional[int] = None) -> tuple[list[float], list[float]]:
    """TTFTs and inter-token gaps of the short requests (with a long prompt first if long_len),
    all homed on `home` (None: where the router sends them)."""
    long_start = time.monotonic()
    if long_len:
        engine.add_request(f"{tag}-long", [3 + i % 300 for i in range(long_len)],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), home=home)
        end = time.monotonic() + delay_s
        while time.monotonic() < end:
            note_long_end(engine.step(timeout_s=0.01), f"{tag}-long", long_start)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    sent = time.monotonic()
    for k in range(4):
        engine.add_request(f"{tag}-s{k}", [5 + (k * 7 + i) % 200 for i in range(32)], params, arrival_time=sent,
                           home=home)
    seen: dict[str, list[float]] = {f"{tag}-s{k}": [] for k in range(4)}
    while engine.has_unfinished_requests():
        outputs = engine.step(timeout_s=0.01)
        note_long_end(outputs, f"{tag}-long", long_start)
        for out in outputs:
            if out.request_id in seen:
                now = time.monotonic()
                seen[out.request_id].extend([now] * (len(out.output_token_ids) - len(seen[out.request_id])))
    ttfts = [times[0] - sent for times in seen.values()]
    gaps = [b - a for times in seen.values() for a, b in zip(times, times[1:])]
    return ttfts, gaps


LONG_DONE: list[float] = []  # seconds from the long prompt's arrival to its end


def note_long_end(outputs: list, long_id: str, long_start: float) -> None:
    """Record when the long request finished (it may, during the delay, before any short one)."""
    if any(out.request_id == long_id and out.finished for out in outputs):
        LONG_DONE.append(time.monotonic() - long_start)


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", type=int, default=10000)
    parser.add_argument("--delay", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None)
    parser.add_argument("--prefill-slowdown", type=float, default=SchedulerConfig.prefill_slowdown)
    parser.add_argument("--lone-prefill-slowdown", type=float, default=SchedulerConfig.lone_prefill_slowdown)
    parser.add_argument("--num-instances", type=int, default=1, help="2 or more: the long prompt spans them")
    parser.add_argument("--spanning-prefill-every", type=int, default=SchedulerConfig.spanning_prefill_every)
    args = parser.parse_args()
    split = args.num_instances > 1
    pool_tokens = int(0.6 * args.long) + 1000 if split else args.long + 2000
    engine = LLMEngine(EngineConfig(
        cache=CacheConfig(num_blocks_per_instance=-(-pool_tokens // 16)),
        cluster=ClusterConfig(num_instances=args.num_instances),
        scheduler=SchedulerConfig(long_prefill_token_threshold=args.long_prefill_token_threshold,
                                  prefill_slowdown=args.prefill_slowdown,
                                  lone_prefill_slowdown=args.lone_prefill_slowdown,
                                  spanning_prefill_every=args.spanning_prefill_every),
    ))
    home = 0 if split else None
    alone_t, alone_g, busy_t, busy_g = [], [], [], []
    try:
        run_shorts(engine, "warmup", 0, 0, home)
        for r in range(args.repeats):
            t, g = run_shorts(engine, f"a{r}", 0, 0, home)
            alone_t += t
            alone_g += g
            t, g = run_shorts(engine, f"b{r}", args.long, args.delay, home)
            busy_t += t
            busy_g += g
    finally:
        engine.shutdown()
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    print(f"short requests alone:      TTFT median {ms(statistics.median(alone_t))}, "
          f"gap median {ms(statistics.median(alone_g))}, p90 {ms(p90(alone_g))}")
    print(f"during a {args.long}-token prefill: TTFT median {ms(statistics.median(busy_t))}, "
          f"gap median {ms(statistics.median(busy_g))}, p90 {ms(p90(busy_g))}")
    print(f"TTFT ratio {statistics.median(busy_t) / statistics.median(alone_t):.2f} (goal <= 3), "
          f"gap ratio median {statistics.median(busy_g) / statistics.median(alone_g):.2f}, "
          f"p90 {p90(busy_g) / p90(alone_g):.2f} (goal <= 3)")
    print(f"the long request took {statistics.median(LONG_DONE):.2f} s from arrival to its end (median)")


if __name__ == "__main__":
    main()
