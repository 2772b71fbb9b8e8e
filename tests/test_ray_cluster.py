"""Instances as Ray actors talking over ZeroMQ: a request spread over the actors gives the same
greedy tokens as transformers, a migration between them keeps it exact, nothing leaks; an actor
killed (SIGKILL) or stopped (SIGSTOP, later SIGCONT) mid-generation loses no request. Each test
starts an embedded Ray (~10-20 s)."""

from __future__ import annotations

import os
import signal
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


def _run_through_fault(tmp_path, signals, seed):
    """3 actors, striped so every request has KV on every actor; `signals` strike actor 1
    mid-generation. Returns the LLM (still running) and the final outputs."""
    write_tiny_checkpoint(tmp_path, arch="llama", seed=seed)
    llm = make_llm(tmp_path, instances=3, blocks=16, batched_tokens=32, backend="ray", placement="striped",
                   instance_timeout_s=2.0, heartbeat_interval_s=0.05,
                   debug_step_delay_s={0: 0.05, 1: 0.05, 2: 0.05})  # still decoding when it strikes
    engine = llm.engine
    batch = prompts(seed, [70, 30, 50])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params, home=i)
    final: dict = {}
    struck = False
    deadline = time.monotonic() + 120
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests did not finish after the fault"
        for out in engine.step(timeout_s=0.02):
            final[out.request_id] = out
        if not struck and len(final) == 3 and all(o.num_output_tokens >= 2 for o in final.values()):
            for sig in signals:
                os.kill(engine.cluster.pids[1], sig)
            struck = True
    for i, prompt in enumerate(batch):
        assert final[f"r{i}"].output_token_ids == hf_greedy(tmp_path, prompt, 24), final[f"r{i}"].error
    assert engine.failures.num_instance_failures == 1
    assert engine.failures.num_redispatched_requests == 1  # r1 was homed on actor 1
    return llm, batch


def test_ray_sigkill_of_an_actor_loses_no_request(tmp_path):
    llm, batch = _run_through_fault(tmp_path, [signal.SIGKILL], seed=31)
    try:
        assert [h["state"] for h in llm.engine.instance_health()] == ["alive", "dead", "alive"]
        assert_all_free(llm, exclude=(1,))
        (after,) = llm.generate([batch[1]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert after.output_token_ids == hf_greedy(tmp_path, batch[1], 8)
        # A replacement actor (a new id) joins and serves a request striped over it and the others.
        engine = llm.engine
        assert engine.add_instance() == 3
        assert len(set(engine.cluster.pids)) == 4
        engine.add_request("on-new", batch[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), home=3)
        final = {}
        while engine.has_unfinished_requests():
            for out in engine.step(timeout_s=0.05):
                final[out.request_id] = out
        assert final["on-new"].output_token_ids == hf_greedy(tmp_path, batch[0], 8)
        assert_all_free(llm, exclude=(1,))
    finally:
        llm.shutdown()


def test_ray_sigstop_then_sigcont_the_actor_is_fenced(tmp_path):
    llm, batch = _run_through_fault(tmp_path, [signal.SIGSTOP], seed=32)
    try:
        os.kill(llm.engine.cluster.pids[1], signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not llm.engine.cluster.is_fenced(1):  # it learns it was declared dead and stops
            assert time.monotonic() < deadline, "the resumed actor did not stop itself"
            time.sleep(0.1)
        assert_all_free(llm, exclude=(1,))
        (after,) = llm.generate([batch[0]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert after.output_token_ids == hf_greedy(tmp_path, batch[0], 8)
    finally:
        llm.shutdown()
