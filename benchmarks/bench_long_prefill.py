"""Short requests during a long prefill: TTFT and inter-token gaps vs the same requests alone.

    python benchmarks/bench_long_prefill.py [--long 10000] [--delay 2.0] [--repeats 2]

One engine (default model, one instance). Per repeat, interleaved: (a) 4 short requests on an
idle engine; (b) a --long token prompt, then after --delay seconds the same 4 short requests.
Printed: median TTFT and median / p90 inter-token gap of the short requests in (b) over (a).
Goal (issue 11): both ratios <= 3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.engine import LLMEngine  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402


def run_shorts(engine: LLMEngine, tag: str, long_len: int, delay_s: float) -> tuple[list[float], list[float]]:
    """TTFTs and inter-token gaps of the short requests (with a long prompt first if long_len)."""
    long_start = time.monotonic()
    if long_len:
        engine.add_request(f"{tag}-long", [3 + i % 300 for i in range(long_len)],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        end = time.monotonic() + delay_s
        while time.monotonic() < end:
            engine.step(timeout_s=0.01)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    sent = time.monotonic()
    for k in range(4):
        engine.add_request(f"{tag}-s{k}", [5 + (k * 7 + i) % 200 for i in range(32)], params, arrival_time=sent)
    seen: dict[str, list[float]] = {f"{tag}-s{k}": [] for k in range(4)}
    while engine.has_unfinished_requests():
        for out in engine.step(timeout_s=0.01):
            if out.request_id == f"{tag}-long" and out.finished:
                LONG_DONE.append(time.monotonic() - long_start)
            if out.request_id in seen:
                now = time.monotonic()
                seen[out.request_id].extend([now] * (len(out.output_token_ids) - len(seen[out.request_id])))
    ttfts = [times[0] - sent for times in seen.values()]
    gaps = [b - a for times in seen.values() for a, b in zip(times, times[1:])]
    return ttfts, gaps


LONG_DONE: list[float] = []  # seconds from the long prompt's arrival to its end


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
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(
        cache=CacheConfig(num_blocks_per_instance=-(-(args.long + 2000) // 16)),
        scheduler=SchedulerConfig(long_prefill_token_threshold=args.long_prefill_token_threshold,
                                  prefill_slowdown=args.prefill_slowdown,
                                  lone_prefill_slowdown=args.lone_prefill_slowdown),
    ))
    alone_t, alone_g, busy_t, busy_g = [], [], [], []
    try:
        run_shorts(engine, "warmup", 0, 0)
        for r in range(args.repeats):
            t, g = run_shorts(engine, f"a{r}", 0, 0)
            alone_t += t
            alone_g += g
            t, g = run_shorts(engine, f"b{r}", args.long, args.delay)
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
