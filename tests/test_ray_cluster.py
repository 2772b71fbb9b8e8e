"""Instances as Ray actors with a gloo process group: a request spread over two actors gives the
same greedy tokens as transformers. One embedded Ray start (~10-20 s) for the whole module."""

from __future__ import annotations

import pytest

from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from infinite_llm.control.migration import _Order
from infinite_llm.engine import LLM
from infinite_llm.sampling import SamplingParams
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint

ray = pytest.importorskip("ray")


def test_ray_instances_serve_request_larger_than_one_instance(tmp_path):
    write_tiny_checkpoint(tmp_path, arch="llama", seed=11)
    config = EngineConfig(
        model=str(tmp_path),
        cache=CacheConfig(block_size=8, num_blocks_per_instance=6),
        cluster=ClusterConfig(num_instances=2, backend="ray", placement="infinite"),
        scheduler=SchedulerConfig(max_num_batched_tokens=16),
    )
    llm = LLM(model=str(tmp_path), config=config)
    try:
        prompt = [3 + (i * 13) % 150 for i in range(60)]  # 60 + 12 tokens > 48 slots per instance
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        out = llm.generate([prompt], params)[0]
        assert out.output_token_ids == hf_greedy(tmp_path, prompt, 12)
        kv = llm.engine.kv
        kv.check_invariants()
        assert all(kv.num_used_blocks(i) == 0 for i in range(2))
        # Instances really are separate processes.
        assert len(set(llm.engine.executor.pids)) == 2

        # Block migration between the actors (background copy on its own process group).
        engine = llm.engine
        migrated_before = engine.migrations.num_migrated_blocks
        engine.migrations.interval_steps = 10**9  # no automatic plans; one injected order
        prompt = prompt[:30]
        engine.add_request("m", prompt, params)
        while engine.scheduler.requests["m"].num_computed_tokens < len(prompt):
            engine.step()
        home = engine.scheduler.requests["m"].home
        engine.migrations.orders = [_Order("m", src=home, dst=1 - home, blocks_left=2)]
        outputs = []
        while engine.has_unfinished_requests():
            outputs.extend(engine.step())
        assert engine.migrations.num_migrated_blocks - migrated_before == 2
        assert outputs[-1].output_token_ids == hf_greedy(tmp_path, prompt, 12)
        assert all(kv.num_used_blocks(i) == 0 for i in range(2))
    finally:
        llm.shutdown()
