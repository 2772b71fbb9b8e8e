"""Failover: what losing one instance of three costs a steady load.

    python benchmarks/bench_failover.py [--backend local|ray] [--fault kill|stop] [--seconds 12]

A closed loop keeps --concurrency greedy requests in flight on 3 instances (default model,
`striped`, so every request has KV on the victim and must be recomputed somewhere). At
--fault-at seconds, instance 1 is killed (local: its step raises; ray: SIGKILL) or stopped
(local: its step hangs; ray: SIGSTOP), and detection then rests on --instance-timeout.
Printed, all from this one run:
- fault -> death known at the front end (InstanceDown) and death known -> first token of each
  re-dispatched request (median, max), and fault -> first recomputed token;
- generated tokens/s in 0.5 s windows: before the fault (mean), the worst window after it, and
  the last few windows (2 instances left), each as a ratio to "before";
- lost requests (must be 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig  # noqa: E402
from infinite_llm.engine import LLMEngine  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402

VICTIM = 1
WINDOW_S = 0.5


def make_engine(args: argparse.Namespace) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=args.model,
        cache=CacheConfig(block_size=16, num_blocks_per_instance=256),
        cluster=ClusterConfig(num_instances=3, backend=args.backend, placement="striped",
                              instance_timeout_s=args.instance_timeout, heartbeat_interval_s=0.05),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
    ))


def inject(engine: LLMEngine, args: argparse.Namespace) -> None:
    if args.backend == "ray":
        os.kill(engine.cluster.pids[VICTIM], signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
        return
    instance = engine.cluster.instances[VICTIM]
    if args.fault == "kill":
        def boom():
            raise RuntimeError("benchmark: injected crash")

        instance.scheduler.schedule = boom
    else:
        never = threading.Event()
        instance.runner.execute = lambda batch, step: never.wait()


def run(args: argparse.Namespace) -> dict:
    engine = make_engine(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    prompt = [3 + (i * 7) % 200 for i in range(args.prompt_len)]
    start = time.monotonic()
    fault_at = start + args.fault_at
    end = start + args.seconds
    tokens: list[tuple[float, int]] = []
    in_flight, submitted, finished, lost = set(), 0, 0, 0
    faulted = False
    down_known = None
    try:
        while time.monotonic() < end:
            while len(in_flight) < args.concurrency:
                rid = f"r{submitted}"
                engine.add_request(rid, prompt, params)
                in_flight.add(rid)
                submitted += 1
            for out in engine.step(timeout_s=0.01):
                tokens.append((time.monotonic(), len(out.output_token_ids) if out.output_token_ids else 0))
                if out.finished:
                    in_flight.discard(out.request_id)
                    finished += 1
                    lost += out.finish_reason != "length"
            if not faulted and time.monotonic() >= fault_at:
                inject(engine, args)
                faulted = True
            if faulted and down_known is None and engine.failures.num_instance_failures:
                down_known = time.monotonic()
        return summarize(engine, tokens, start, fault_at, end, down_known, finished, lost)
    finally:
        if args.backend == "ray" and args.fault == "stop":
            os.kill(engine.cluster.pids[VICTIM], signal.SIGCONT)
        engine.shutdown()


def summarize(engine, tokens, start, fault_at, end, down_known, finished, lost) -> dict:
    windows = [0] * int((end - start) / WINDOW_S + 1)
    for when, n in tokens:
        windows[int((when - start) / WINDOW_S)] += n
    rates = [n / WINDOW_S for n in windows[:-1]]
    first_fault_window = int((fault_at - start) / WINDOW_S)
    before = rates[1:first_fault_window]  # the first window includes start-up
    after = rates[first_fault_window:]
    recovery = engine.failures.recovery_seconds
    return {
        "detect_s": (down_known - fault_at) if down_known else float("nan"),
        "recovery_median_s": statistics.median(recovery) if recovery else float("nan"),
        "recovery_max_s": max(recovery) if recovery else float("nan"),
        "redispatched": engine.failures.num_redispatched_requests,
        "before": statistics.mean(before), "dip": min(after), "last": statistics.mean(after[-4:]),
        "finished": finished, "lost": lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--fault", choices=["kill", "stop"], default="kill")
    parser.add_argument("--instance-timeout", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--fault-at", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    r = run(args)
    print(f"backend={args.backend} fault={args.fault} instance-timeout={args.instance_timeout}s "
          f"concurrency={args.concurrency} prompt={args.prompt_len} output={args.output_len}")
    print(f"fault -> death known at the front end: {r['detect_s']:.2f} s")
    print(f"death known -> first token of a re-dispatched request: median {r['recovery_median_s']:.3f} s, "
          f"max {r['recovery_max_s']:.3f} s ({r['redispatched']} re-dispatched)")
    print(f"fault -> first recomputed token (worst): {r['detect_s'] + r['recovery_max_s']:.2f} s")
    print(f"tokens/s before the fault {r['before']:.0f}; worst 0.5 s window after: {r['dip']:.0f} "
          f"({r['dip'] / r['before']:.2f}x); last 2 s on 2 instances: {r['last']:.0f} ({r['last'] / r['before']:.2f}x)")
    print(f"requests finished {r['finished']}, lost {r['lost']} (must be 0)")


if __name__ == "__main__":
    main()
