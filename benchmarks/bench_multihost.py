"""Decode latency across namespaced "hosts" with delayed / rate-limited links vs plain ones,
side by side in one run.

    sudo python benchmarks/bench_multihost.py [--hosts 3] [--requests 1] [--repeats 3] [--max-tokens 24]
        [--conditions "0.5,10gbit;switch:0;switch:0.5,10gbit"]

Builds the hosts of tests/multihost_netns.py (network namespaces, veth links to a bridge, a Ray
head and workers), starts the engine once with one instance per host and placement "striped"
(every request's KV on every host, so each decode step ships queries and partials over the links
for every layer), then, for --repeats rounds, runs the same batch under each link condition in
turn (interleaved, so drift in the machine's load hits all conditions alike):

- "none": the bridge, no shaping (the baseline);
- "DELAY_MS,RATE": `tc netem delay DELAY_MS rate RATE` on every host's egress; a kernel without
  sch_netem gets `tbf` with the rate and NO delay (the "applied" column says so);
- "switch:DELAY_MS[,RATE]": the bridge replaced by a user-space switch that holds every frame
  DELAY_MS (tests/netns_delay_switch.py; link delay without netem), plus the rate if given. The
  forwarder itself costs time, so its delayed runs are compared with "switch:0".

Printed per condition: the median over rounds of the batch's mean inter-token time, its ratio to
"none" and to "switch:0", and the bytes the links carried per generated token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.engine_helpers import prompts  # noqa: E402
from tests.multihost_netns import WORKDIR, multihost, run_driver, unavailable_reason  # noqa: E402


def inter_token_s(outputs: dict[str, dict]) -> float:
    """Mean over requests of (last token - first token) / (tokens - 1): the decode latency."""
    gaps = [(o["finished_time"] - o["first_token_time"]) / (o["num_output_tokens"] - 1)
            for o in outputs.values() if o["num_output_tokens"] > 1]
    return statistics.fmean(gaps)


def link_bytes_per_token(run: dict) -> float:
    tokens = sum(o["num_output_tokens"] for o in run["outputs"].values())
    moved = sum(run["links_after"][ns]["tx"] - run["links_before"][ns]["tx"] for ns in run["links_after"])
    return moved / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=1,
                        help="requests in the batch, request i homed on instance i (1: one home's critical path; "
                             "more: the hosts also compete for this machine's cores)")
    parser.add_argument("--conditions", default="0.5,10gbit;switch:0;switch:0.5,10gbit",
                        help='";"-separated conditions, each run after "none" in every round')
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot build namespaced hosts here: {reason}")

    from tests.hf_fixtures import write_tiny_checkpoint

    conditions = ["none", *[c for c in args.conditions.split(";") if c and c != "none"]]
    WORKDIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORKDIR, prefix="bench-model-") as model_dir:
        # The test's shape (1 KB queries per token and layer, 4 layers), on a path every host sees.
        model = write_tiny_checkpoint(Path(model_dir), arch="llama", seed=21, hidden_size=256,
                                      intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                                      num_hidden_layers=4)
        batch = prompts(5, [(50, 40, 60)[i % 3] for i in range(args.requests)])
        with multihost(args.hosts) as cluster:
            report = run_driver(cluster, ["--model", str(model), "--prompts", json.dumps(batch),
                                          "--max-tokens", str(args.max_tokens), "--placement", "striped",
                                          "--conditions", ";".join(conditions), "--repeats", str(args.repeats)],
                                timeout=600)

    print(f"{args.hosts} hosts (network namespaces, veth links, a switch namespace), one instance each:")
    for rank, actor in enumerate(report["actors"]):
        print(f"  instance {rank}: {actor['netns']} ({actor['zmq']})")
    print(f"batch: {len(batch)} request(s) striped over all hosts (request i homed on instance i), "
          f"{args.max_tokens} tokens each; {args.repeats} interleaved rounds\n")
    by_condition = {c: [r for r in report["runs"] if r["condition"] == c] for c in conditions}
    latency = {c: statistics.median(inter_token_s(r["outputs"]) for r in runs) for c, runs in by_condition.items()}
    print(f"{'condition':<22} {'applied':<62} {'inter-token ms':>14} {'vs none':>8} {'vs switch:0':>11} "
          f"{'link B/token':>12}")
    for condition, runs in by_condition.items():
        vs_switch = f"{latency[condition] / latency['switch:0']:.2f}" if condition.startswith("switch:") and \
            "switch:0" in latency else "-"
        per_token = statistics.median(link_bytes_per_token(r) for r in runs)
        print(f"{condition:<22} {runs[0]['applied']:<62} {latency[condition] * 1e3:>14.2f} "
              f"{latency[condition] / latency['none']:>8.2f} {vs_switch:>11} {per_token:>12.0f}")


if __name__ == "__main__":
    main()
