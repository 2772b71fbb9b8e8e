"""A lost instance loses no request (embedded backend: instance threads in this process).

Faults are injected the way they would strike: an exception escaping an instance's step (the
instance stops, fail-stop), and a step loop hung in a kernel (its heartbeat thread still beats)
that later resumes. Every request finishes with the greedy tokens transformers gives, and the
survivors' pools end empty with consistent ledgers.
"""

from __future__ import annotations

import threading
import time

import pytest

from infinite_llm.control.dispatch import NoLiveInstanceError
from infinite_llm.engine import LLM
from infinite_llm.sampling import SamplingParams
from tests.engine_helpers import assert_all_free, drain, prompts, run_until
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-failover")
    write_tiny_checkpoint(path, arch="llama", seed=21)
    return path


@pytest.fixture
def engines(engines):
    """conftest's factory with fault-test defaults: steps slow enough that requests still decode
    when a fault strikes on any machine, and a short instance timeout."""
    def make(*args, **kwargs) -> LLM:
        kwargs.setdefault("debug_step_delay_s", {i: 0.02 for i in range(kwargs["instances"])})
        kwargs.setdefault("instance_timeout_s", 1.0)
        kwargs.setdefault("heartbeat_interval_s", 0.05)
        return engines(*args, **kwargs)

    return make


def crash_next_step(llm: LLM, rank: int) -> None:
    """The instance's next step raises out of the step loop."""
    def boom():
        raise RuntimeError("injected fault: this instance's step crashed")

    llm.engine.cluster.instances[rank].scheduler.schedule = boom


def tokens_so_far(outputs: dict, rid: str) -> int:
    return outputs[rid][-1].num_output_tokens if rid in outputs else 0


@pytest.mark.parametrize("placement", ["striped", "infinite"])
def test_crashed_instance_loses_no_request(checkpoint, engines, placement):
    """Requests homed on the crashed instance are re-dispatched with their tokens so far; those
    homed elsewhere with KV on it are recomputed by their homes; streams go on exactly."""
    llm = engines(checkpoint, instances=3, blocks=16, batched_tokens=32, placement=placement)
    engine = llm.engine
    batch = prompts(22, [90, 40, 70, 30, 50, 60])
    homes = [0, 1, 2, 0, 1, 2]
    lengths = [48 if home == 1 else 16 for home in homes]  # instance 1's requests outlive the fault
    for i, (prompt, home, n) in enumerate(zip(batch, homes, lengths)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), home=home)
    outputs: dict = {}
    run_until(engine, lambda: tokens_so_far(outputs, "r1") >= 2 and tokens_so_far(outputs, "r4") >= 2, outputs)
    crash_next_step(llm, 1)
    final = drain(engine, outputs)
    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        assert final[f"r{i}"].finish_reason == "length", final[f"r{i}"].error
        assert final[f"r{i}"].output_token_ids == hf_greedy(checkpoint, prompt, n), f"r{i}"
    # Streams neither repeat nor skip: the cumulative outputs only ever grow by appending.
    for outs in outputs.values():
        for before, after in zip(outs, outs[1:]):
            assert after.output_token_ids[: len(before.output_token_ids)] == before.output_token_ids
    assert engine.failures.num_instance_failures == 1
    assert engine.failures.num_redispatched_requests == 2  # r1 and r4 were homed on instance 1
    assert len(engine.failures.recovery_seconds) == 2
    assert [h["state"] for h in engine.instance_health()] == ["alive", "dead", "alive"]
    assert_all_free(llm, exclude=(1,))
    (after,) = llm.generate([batch[0]], GREEDY)  # the survivors keep serving
    assert after.output_token_ids == hf_greedy(checkpoint, batch[0], 16)


def test_dead_creditor_debtor_is_recomputed_by_its_home(checkpoint, engines):
    """Instance 0's request borrowed blocks from instance 1; 1 crashes; 0 recomputes it alone."""
    llm = engines(checkpoint, instances=2, blocks=16, batched_tokens=32)
    engine = llm.engine
    filler, long = prompts(23, [76, 100])
    engine.add_request("filler", filler, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), home=0)
    engine.add_request("long", long, GREEDY, home=0)  # 13 blocks, 6 free at home: borrows from 1
    outputs: dict = {}
    run_until(engine, lambda: tokens_so_far(outputs, "long") >= 2, outputs)
    assert engine.cluster.instances[0].rm.num_borrowed > 0
    crash_next_step(llm, 1)
    engine.add_request("on-1", [5] * 10, GREEDY, home=1)  # wakes instance 1's loop into the fault
    final = drain(engine, outputs)
    assert final["long"].output_token_ids == hf_greedy(checkpoint, long, 16)
    assert final["on-1"].output_token_ids == hf_greedy(checkpoint, [5] * 10, 16)
    assert engine.cluster.instances[0].num_recomputed == 1
    assert_all_free(llm, exclude=(1,))


def test_wedged_instance_is_declared_dead_and_fenced_when_it_resumes(checkpoint, engines):
    """Instance 2's loop hangs inside a step (its heartbeat thread still beats): it is declared
    dead by its loop age, its requests finish elsewhere; when it resumes it stops itself and
    its late messages change nothing."""
    llm = engines(checkpoint, instances=3, blocks=16, batched_tokens=32, placement="striped")
    engine = llm.engine
    wedged = engine.cluster.instances[2]
    release = threading.Event()
    execute = wedged.runner.execute

    def hang(batch, step, called_off=None):
        release.wait()
        return execute(batch, step, called_off)

    batch = prompts(24, [60, 50, 40])
    lengths = [16, 16, 48]  # r2, homed on the instance that hangs, outlives the fault
    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), home=i)
    outputs: dict = {}
    run_until(engine, lambda: tokens_so_far(outputs, "r2") >= 2, outputs)
    wedged.runner.execute = hang
    final = drain(engine, outputs)
    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        assert final[f"r{i}"].output_token_ids == hf_greedy(checkpoint, prompt, n), f"r{i}"
    assert engine.failures.num_redispatched_requests == 1
    release.set()  # it resumes: the step finishes, its reports are dropped, it stops
    deadline = time.monotonic() + 10
    while not wedged.fenced:
        assert time.monotonic() < deadline, "the resumed instance did not stop itself"
        time.sleep(0.05)
    assert_all_free(llm, exclude=(2,))
    (after,) = llm.generate([batch[2]], GREEDY)
    assert after.output_token_ids == hf_greedy(checkpoint, batch[2], 16)


def test_request_the_survivors_cannot_hold_fails_with_the_reason(checkpoint, engines):
    llm = engines(checkpoint, instances=2, blocks=8, batched_tokens=32)
    engine = llm.engine
    (prompt,) = prompts(25, [90])  # 12 blocks of 8: more than one instance's 8
    engine.add_request("big", prompt, GREEDY, home=0)
    outputs: dict = {}
    run_until(engine, lambda: tokens_so_far(outputs, "big") >= 1, outputs)
    crash_next_step(llm, 1)
    engine.add_request("on-1", [7] * 5, SamplingParams(max_tokens=2), home=1)
    final = drain(engine, outputs)
    assert final["big"].finish_reason == "abort"
    assert "instance 1 died" in final["big"].error and "at most 64 tokens" in final["big"].error
    assert_all_free(llm, exclude=(1,))


def test_no_instance_left(checkpoint, engines):
    llm = engines(checkpoint, instances=2, blocks=16, batched_tokens=32, placement="static")
    engine = llm.engine
    engine.add_request("a", [9] * 20, GREEDY, home=0)
    engine.add_request("b", [8] * 20, GREEDY, home=1)
    outputs: dict = {}
    run_until(engine, lambda: tokens_so_far(outputs, "a") >= 1 and tokens_so_far(outputs, "b") >= 1, outputs)
    crash_next_step(llm, 0)
    crash_next_step(llm, 1)
    final = drain(engine, outputs)
    for rid in "ab":
        assert final[rid].finish_reason == "abort"
        assert "no instance is alive" in final[rid].error
    assert not engine.can_serve()
    with pytest.raises(NoLiveInstanceError):
        engine.add_request("c", [1] * 4, GREEDY)


# ------------------------------------------------------------------------ elastic membership
def test_added_instance_serves_and_lends(checkpoint, engines):
    llm = engines(checkpoint, instances=2, blocks=8, batched_tokens=32, placement="striped")
    engine = llm.engine
    (wide,) = prompts(26, [150])  # 19 blocks + output: more than two instances' 16
    with pytest.raises(ValueError, match="exceeds"):
        engine.add_request("too-wide", wide, GREEDY)
    assert engine.add_instance() == 2
    assert [h["state"] for h in engine.instance_health()] == ["alive", "alive", "alive"]
    engine.add_request("wide", wide, GREEDY, home=2)  # homed on the newcomer, striped over all three
    final = drain(engine, {})
    assert final["wide"].output_token_ids == hf_greedy(checkpoint, wide, 16)
    assert_all_free(llm)


def test_removed_instance_is_drained_and_its_requests_finish_elsewhere(checkpoint, engines):
    llm = engines(checkpoint, instances=3, blocks=16, batched_tokens=32, placement="striped")
    engine = llm.engine
    batch = prompts(27, [60, 50, 40])
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params, home=i)
    outputs: dict = {}
    run_until(engine, lambda: all(tokens_so_far(outputs, f"r{i}") >= 2 for i in range(3)), outputs)
    engine.remove_instance(1)
    final = drain(engine, outputs)
    for i, prompt in enumerate(batch):
        assert final[f"r{i}"].output_token_ids == hf_greedy(checkpoint, prompt, 32), f"r{i}"
    assert engine.failures.num_redispatched_requests == 1
    assert [h["state"] for h in engine.instance_health()] == ["alive", "dead", "alive"]
    assert engine.cluster.instances[1].fenced  # it stopped itself
    assert_all_free(llm, exclude=(1,))
    with pytest.raises(ValueError, match="not a live instance"):
        engine.remove_instance(1)


def test_dead_instance_replaced(checkpoint, engines):
    llm = engines(checkpoint, instances=2, blocks=16, batched_tokens=32)
    engine = llm.engine
    crash_next_step(llm, 1)
    engine.add_request("trigger", [4] * 12, GREEDY, home=1)
    drain(engine, {})
    assert engine.add_instance() == 2
    assert [h["state"] for h in engine.instance_health()] == ["alive", "dead", "alive"]
    engine.add_request("new", [6] * 12, GREEDY, home=2)
    final = drain(engine, {})
    assert final["new"].output_token_ids == hf_greedy(checkpoint, [6] * 12, 16)
    assert_all_free(llm, exclude=(1,))
