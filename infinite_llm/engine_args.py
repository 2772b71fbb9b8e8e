"""Engine options on the command line: one flag per knob of `EngineConfig`, shared by every
subcommand that builds an engine (serve, generate, bench, profile)."""

from __future__ import annotations

import argparse

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="default", help="'default' (built-in model) or a local HF checkpoint folder")
    g.add_argument("--served-model-name", default=None)
    g.add_argument("--num-instances", type=int, default=1, help="instances sharing one distributed KV cache")
    g.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: instances as threads of this process; ray: one Ray actor per instance")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start an embedded one)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--placement", choices=["static", "striped", "infinite"], default="infinite")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-blocks-per-instance", type=int, default=512, help="per-instance KV memory budget, in blocks")
    g.add_argument("--lend-fraction", type=float, default=0.9, help="share of an instance's blocks it may lend")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="per-step token budget (prefill chunk size)")
    g.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="largest prefill chunk one request takes per step (default: the whole budget)")
    g.add_argument("--prefill-slowdown", type=float, default=SchedulerConfig.prefill_slowdown,
                   help="a step carrying a running prompt's chunk may take this many times a decode-only step "
                        "while others decode or wait (chunks are sized from measured step times)")
    g.add_argument("--lone-prefill-slowdown", type=float, default=SchedulerConfig.lone_prefill_slowdown,
                   help="a prompt alone takes the whole budget; a request arriving during its step waits at "
                        "most this - 1 decode-only steps (past that the step is called off and redone); alone "
                        "on an instance other instances wait on, its chunks fit this many decode-only steps")
    g.add_argument("--headroom-fraction", type=float, default=SchedulerConfig.headroom_fraction,
                   help="a request larger than one instance is admitted only while every instance holding part of it keeps this share of its KV pool free for the requests that fit one instance (infinite)")
    g.add_argument("--spanning-prefill-every", type=int, default=SchedulerConfig.spanning_prefill_every,
                   help="a prompt chunk of a request larger than one instance shares a step with requests that fit one at most once every this many steps; else it runs in steps of its own (1: always shares)")
    g.add_argument("--max-waiting", type=int, default=1024, help="waiting-queue bound (HTTP 429 past it)")
    g.add_argument("--rebalance-interval-s", type=float, default=0.5,
                   help="the gManager plans KV migrations this often (infinite policy)")
    g.add_argument("--heartbeat-interval-s", type=float, default=ClusterConfig.heartbeat_interval_s,
                   help="instances report block counts and load to the gManager this often")
    g.add_argument("--instance-timeout", type=float, default=ClusterConfig.instance_timeout_s,
                   dest="instance_timeout_s",
                   help="declare an instance dead when its heartbeats or step loop stop this long (s); "
                        "its requests are then recomputed on the other instances")
    g.add_argument("--cross-host-copy-factor", type=float, default=ClusterConfig.cross_host_copy_factor,
                   help="the rebalancer counts a KV block copied between hosts as this many copies within one")
    g.add_argument("--migration-tokens-per-step", type=int, default=256)
    g.add_argument("--perf-model", default=None, help="profiled perf model JSON (from `infinite-llm profile`)")
    g.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks_per_instance=args.kv_blocks_per_instance,
            lend_fraction=args.lend_fraction,
            dtype=args.dtype,
        ),
        cluster=ClusterConfig(
            num_instances=args.num_instances,
            backend=args.backend,
            ray_address=args.ray_address,
            device=args.device,
            placement=args.placement,
            rebalance_interval_s=args.rebalance_interval_s,
            heartbeat_interval_s=args.heartbeat_interval_s,
            instance_timeout_s=args.instance_timeout_s,
            cross_host_copy_factor=args.cross_host_copy_factor,
            migration_tokens_per_step=args.migration_tokens_per_step,
            perf_model_path=args.perf_model,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            prefill_slowdown=args.prefill_slowdown,
            lone_prefill_slowdown=args.lone_prefill_slowdown,
            headroom_fraction=args.headroom_fraction,
            spanning_prefill_every=args.spanning_prefill_every,
            max_waiting=args.max_waiting,
        ),
        seed=args.seed,
    )
