"""Instances as Ray actors talking over ZeroMQ: a request spread over the actors gives the same
greedy tokens as transformers, a migration between them keeps it exact, nothing leaks. One
embedded Ray start (~10-20 s) for the whole module."""

from __future__ import annotations

import time

import pytest

from infinite_llm.sampling import SamplingParams
from tests.engine_helpers import assert_all_free, make_llm, prompts
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint

ray = pytest.importorskip("ray")


def test_ray_instances_serve_request_larger_than_one_instance(tmp_path):
    write_tiny_checkpoint(tmp_path, arch="llama", seed=11)
    # The home steps slowly so that the migration ordered below lands while "m" still decodes
    # (a copy ordered for a finished request is dropped), even on a loaded 2-core machine.
    llm = make_llm(tmp_path, instances=2, blocks=6, batched_tokens=16, backend="ray",
                   debug_step_delay_s={0: 0.1})
    try:
        prompt = [3 + (i * 13) % 150 for i in range(60)]  # 60 + 12 tokens > 48 slots per instance
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        out = llm.generate([prompt], params)[0]
        assert out.output_token_ids == hf_greedy(tmp_path, prompt, 12)
        assert_all_free(llm)
        assert len(set(llm.engine.cluster.pids)) == 2  # instances really are separate processes

        # Block migration between the actors, ordered while the request decodes.
        engine = llm.engine
        (short,) = prompts(9, [30])
        engine.add_request("m", short, params, home=0)
        outputs = []
        while not any(o.output_token_ids for o in outputs):
            outputs.extend(engine.step())
        engine.order_migration("m", src=0, dst=1, num_blocks=2)
        while engine.has_unfinished_requests():
            outputs.extend(engine.step())
        assert outputs[-1].output_token_ids == hf_greedy(tmp_path, short, 12)
        assert_all_free(llm)
        deadline = time.monotonic() + 5
        while engine.stats().num_migrated_blocks < 2:  # heartbeats carry the counter
            assert time.monotonic() < deadline, "the ordered migration did not happen"
            time.sleep(0.05)
    finally:
        llm.shutdown()


def test_ray_striped_over_three_actors_matches_hf(tmp_path):
    write_tiny_checkpoint(tmp_path, arch="llama", seed=12)
    llm = make_llm(tmp_path, instances=3, blocks=6, batched_tokens=16, backend="ray", placement="striped")
    try:
        batch = prompts(13, [70, 20, 45])
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        for prompt, out in zip(batch, llm.generate(batch, params)):
            assert out.output_token_ids == hf_greedy(tmp_path, prompt, 10)
        assert_all_free(llm)
    finally:
        llm.shutdown()
