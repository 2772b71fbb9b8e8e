"""Factories and checks shared by the engine tests."""

from __future__ import annotations

import random
import time

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from infinite_llm.control.invariants import check_cluster
from infinite_llm.engine import LLM


def make_llm(path, *, instances=1, blocks=256, block_size=8, placement="infinite", batched_tokens=64,
             max_num_seqs=16, backend="local", lend_fraction=0.9, max_waiting=1024, **cluster) -> LLM:
    cluster.setdefault("rebalance_interval_s", 3600.0)  # tests inject migrations explicitly
    config = EngineConfig(
        model=str(path),
        cache=CacheConfig(block_size=block_size, num_blocks_per_instance=blocks, lend_fraction=lend_fraction),
        cluster=ClusterConfig(num_instances=instances, placement=placement, backend=backend, **cluster),
        scheduler=SchedulerConfig(max_num_batched_tokens=batched_tokens, max_num_seqs=max_num_seqs,
                                  max_waiting=max_waiting),
    )
    return LLM(model=str(path), config=config)


def prompts(seed: int, lengths: list[int], vocab: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_until(engine, condition, outputs: dict, timeout_s: float = 60.0) -> None:
    """Step `engine` until `condition()` holds, appending every output to outputs[request_id]."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        for out in engine.step(timeout_s=0.02):
            outputs.setdefault(out.request_id, []).append(out)


def drain(engine, outputs: dict, timeout_s: float = 60.0) -> dict:
    """Step until nothing is unfinished; each request's last output."""
    run_until(engine, lambda: not engine.has_unfinished_requests(), outputs, timeout_s)
    return {rid: outs[-1] for rid, outs in outputs.items()}


def assert_all_free(llm: LLM, timeout_s: float = 10.0, exclude: tuple[int, ...] = ()) -> None:
    """Once the messages in flight land: invariants hold and no block is used anywhere (on the
    instances not in `exclude`: a dead instance's pool died with it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = llm.engine.cluster.control_states(exclude)
        try:
            check_cluster([rm for rm, _ in states], [tables for _, tables in states])
            for rm, _ in states:
                assert rm.pool.num_used == 0, f"instance {rm.instance_id} leaked {rm.pool.num_used} blocks"
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
