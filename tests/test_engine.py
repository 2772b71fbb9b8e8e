"""End-to-end engine tests: greedy tokens identical to HF transformers (float32), single instance
and with the KV cache spread over several independent in-process instances; preemption,
migration in flight, mutual borrowing, a straggler; no leaked blocks."""

from __future__ import annotations

import threading
import time

import pytest

from infinite_llm.control.scheduler import RequestTooLongError
from infinite_llm.engine import LLM
from infinite_llm.instance import attention as attention_module
from infinite_llm.sampling import SamplingParams
from tests.engine_helpers import assert_all_free, drain, prompts, run_until
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    write_tiny_checkpoint(path, arch=request.param, seed=3)
    return path


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-llama-dist")
    write_tiny_checkpoint(path, arch="llama", seed=5)
    return path


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_greedy_matches_hf_mixed_batch(checkpoint, engines):
    batch = prompts(0, [1, 5, 17, 40, 9])
    llm = engines(checkpoint, batched_tokens=24)  # chunked prefill: the 40-token prompt takes 2+ steps
    outputs = llm.generate(batch, GREEDY)
    for prompt, out in zip(batch, outputs):
        assert out.output_token_ids == hf_greedy(checkpoint, prompt, 10)
        assert out.finish_reason == "length"
    assert_all_free(llm)


def test_greedy_matches_hf_with_preemption(llama_checkpoint, engines):
    batch = prompts(1, [30, 26, 33, 21, 28])
    # 12 blocks x 8 tokens = 96 slots, far fewer than the ~190 the batch wants at once.
    llm = engines(llama_checkpoint, blocks=12, batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(batch, params)
    assert sum(o.num_preemptions for o in outputs) > 0, "the test must exercise preemption"
    for prompt, out in zip(batch, outputs):
        assert out.output_token_ids == hf_greedy(llama_checkpoint, prompt, 12)
    assert_all_free(llm)


@pytest.mark.parametrize("placement", ["infinite", "striped"])
@pytest.mark.parametrize("instances", [2, 3, 4])
def test_long_request_spread_over_instances_matches_hf(llama_checkpoint, engines, placement, instances):
    (prompt,) = prompts(2, [90])
    # 6 blocks x 8 tokens: one instance holds 48 tokens, the request needs 110.
    blocks = 6 if instances > 2 else 10
    llm = engines(llama_checkpoint, instances=instances, blocks=blocks, placement=placement, batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outputs = llm.generate([prompt], params)
    assert outputs[0].output_token_ids == hf_greedy(llama_checkpoint, prompt, 20)
    assert_all_free(llm)


@pytest.mark.parametrize("placement", ["static", "infinite", "striped"])
def test_distributed_batch_matches_hf_for_every_policy(llama_checkpoint, engines, placement):
    batch = prompts(3, [35, 12, 50, 7])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = engines(llama_checkpoint, instances=3, blocks=9, batched_tokens=24, placement=placement)
    outputs = llm.generate(batch, params)
    for prompt, out in zip(batch, outputs):
        assert out.output_token_ids == hf_greedy(llama_checkpoint, prompt, 8)
    assert_all_free(llm)


def test_preemption_with_borrowed_blocks_matches_hf(llama_checkpoint, engines):
    """One home borrowing from a peer runs out of memory for its batch and preempts."""
    batch = prompts(6, [30, 26, 33, 28])
    # Home 0: 5 blocks + 4 lendable on instance 1 = 72 slots; two requests grow to 11 blocks.
    llm = engines(llama_checkpoint, instances=2, blocks=5, batched_tokens=24)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(batch):
        llm.engine.add_request(f"p{i}", prompt, params, home=0)
    final = {}
    while llm.engine.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert sum(o.num_preemptions for o in final.values()) > 0, "the test must exercise preemption"
    assert llm.engine.cluster.instances[1].guests.num_served > 0, "the test must borrow"
    for i, prompt in enumerate(batch):
        assert final[f"p{i}"].output_token_ids == hf_greedy(llama_checkpoint, prompt, 12)
    assert_all_free(llm)


def _wait_first_token(engine, request_id: str, outputs: list) -> None:
    deadline = time.monotonic() + 30
    while not any(o.request_id == request_id and o.output_token_ids for o in outputs):
        assert time.monotonic() < deadline, "no first token"
        outputs.extend(engine.step())


@pytest.mark.parametrize("direction", ["home_to_peer", "peer_to_home", "peer_to_peer"])
def test_migration_in_flight_keeps_output_exact(llama_checkpoint, engines, direction):
    (prompt,) = prompts(4, [48])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # 5 blocks per instance: the 48-token prompt (6 blocks) borrows from the peers.
    blocks = 32 if direction == "home_to_peer" else 5
    llm = engines(llama_checkpoint, instances=3, blocks=blocks, batched_tokens=64)
    engine = llm.engine
    outputs: list = []
    if direction == "peer_to_home":  # a short request holds 3 home blocks while r is admitted
        engine.add_request("filler", [5] * 20, SamplingParams(max_tokens=20, ignore_eos=True), home=0)
        _wait_first_token(engine, "filler", outputs)
    engine.add_request("r", prompt, params, home=0)
    _wait_first_token(engine, "r", outputs)
    if direction == "peer_to_home":
        engine.abort_request("filler")  # its 3 blocks free up at home
    if direction == "home_to_peer":
        engine.order_migration("r", src=0, dst=1, num_blocks=5)
    elif direction == "peer_to_home":
        engine.order_migration("r", src=_creditor(llm, "r"), dst=0, num_blocks=1)
    else:
        src = _creditor(llm, "r")
        engine.order_migration("r", src=src, dst=3 - src, num_blocks=2)
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    final = [o for o in outputs if o.request_id == "r"][-1]
    assert final.output_token_ids == hf_greedy(llama_checkpoint, prompt, 16)
    assert sum(i.migrations.num_migrated_blocks for i in llm.engine.cluster.instances) > 0
    assert_all_free(llm)


def _creditor(llm: LLM, request_id: str) -> int:
    home = llm.engine.cluster.instances[0]
    with home.lock:
        return sorted(home.rm.borrowed_ledger[request_id])[0]


def _run_pair(llm: LLM, expect_both_ways) -> dict:
    engine = llm.engine
    outputs: dict[str, object] = {}
    deadline = time.monotonic() + 60
    both_ways = False
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "mutual borrowing deadlocked"
        for out in engine.step():
            outputs[out.request_id] = out
        both_ways |= expect_both_ways()
    assert both_ways, "the test must make each instance hold blocks of the other's request"
    return outputs


@pytest.mark.parametrize("placement", ["striped", "infinite"])
def test_mutual_borrowing_completes(llama_checkpoint, engines, placement):
    """A borrows from B while B borrows from A, both decoding at once: no deadlock, HF-identical.
    striped spreads both requests over both instances from the start; under infinite each home
    moves blocks of its request to the other (lent blocks both ways)."""
    a, b = prompts(7, [70, 66])
    llm = engines(llama_checkpoint, instances=2, blocks=20, batched_tokens=32, placement=placement,
                  debug_step_delay_s={0: 0.005, 1: 0.005})  # both still decode when the orders land
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = llm.engine
    engine.add_request("a", a, params, home=0)
    engine.add_request("b", b, params, home=1)
    if placement == "infinite":
        first: list = []
        _wait_first_token(engine, "a", first)
        engine.order_migration("a", src=0, dst=1, num_blocks=3)
        _wait_first_token(engine, "b", first)
        engine.order_migration("b", src=1, dst=0, num_blocks=3)
    rms = [i.rm for i in llm.engine.cluster.instances]
    outputs = _run_pair(llm, lambda: rms[0].num_borrowed > 0 and rms[1].num_borrowed > 0)
    assert outputs["a"].output_token_ids == hf_greedy(llama_checkpoint, a, 24)
    assert outputs["b"].output_token_ids == hf_greedy(llama_checkpoint, b, 24)
    assert_all_free(llm)


@pytest.mark.parametrize("served_on", ["instance-0-loop", "instance-1-pump"])
def test_split_queries_are_served_on_the_homes_thread_or_the_holders_pump(llama_checkpoint, engines, monkeypatch,
                                                                           served_on):
    """In process, a holder serves a small query on its home's step thread (no pump wake-up);
    one over INLINE_MAX_KV_BYTES on its own pump, in parallel with the home. Both exact."""
    if served_on.endswith("pump"):
        monkeypatch.setattr(attention_module, "INLINE_MAX_KV_BYTES", -1)
    (prompt,) = prompts(2, [90])
    llm = engines(llama_checkpoint, instances=2, blocks=10, batched_tokens=16)
    holder = llm.engine.cluster.instances[1]
    threads: set[str] = set()
    serve = holder.guests.serve

    def recording_serve(query):
        threads.add(threading.current_thread().name)
        return serve(query)

    holder.guests.serve = recording_serve
    llm.engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), home=0)
    final = {}
    while llm.engine.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert final["r"].output_token_ids == hf_greedy(llama_checkpoint, prompt, 20)
    assert threads == {served_on}
    assert_all_free(llm)


def test_straggler_does_not_block_other_instances(llama_checkpoint, engines):
    """Requests homed on healthy instances, with no blocks on the slowed one, finish while the
    straggler has done only a fraction of their steps."""
    llm = engines(llama_checkpoint, instances=3, blocks=64, placement="static",
                  debug_step_delay_s={2: 0.3})
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    batch = prompts(8, [12, 14, 10])
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params, home=i)
    done: dict[str, object] = {}
    while "r0" not in done or "r1" not in done:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    slow = llm.engine.cluster.instances[2]
    assert "r2" not in done and slow.num_steps < 24 / 2, (
        f"the healthy instances waited for the straggler ({slow.num_steps} straggler steps)"
    )
    for i in (0, 1):
        assert done[f"r{i}"].output_token_ids == hf_greedy(llama_checkpoint, batch[i], 24)


def test_static_rejects_request_larger_than_instance(llama_checkpoint, engines):
    llm = engines(llama_checkpoint, instances=2, blocks=4, placement="static")
    with pytest.raises(RequestTooLongError):
        llm.engine.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=1))
    # The same request fits once the cluster's memory is pooled.
    llm2 = engines(llama_checkpoint, instances=2, blocks=4, placement="infinite")
    llm2.engine.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=1))


def test_abort_releases_local_and_remote_blocks(llama_checkpoint, engines):
    llm = engines(llama_checkpoint, instances=2, blocks=4, batched_tokens=16)
    engine = llm.engine
    engine.add_request("a", list(range(3, 43)), SamplingParams(max_tokens=14, ignore_eos=True))
    outputs: list = []
    _wait_first_token(engine, "a", outputs)
    used = [i.rm.pool.num_used for i in llm.engine.cluster.instances]
    assert all(u > 0 for u in used), f"the request must span both instances, used {used}"
    engine.abort_request("a")
    outs = engine.step()
    assert outs and outs[0].finish_reason == "abort"
    assert_all_free(llm)
    engine.abort_request("a")  # idempotent


def test_stop_strings_max_tokens_and_seed(llama_checkpoint, engines):
    llm = engines(llama_checkpoint)
    free = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert len(free.output_token_ids) == 8 and free.finish_reason == "length"
    if len(free.text) >= 3:
        stop = free.text[1:3]
        stopped = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=8, stop=[stop], ignore_eos=True))[0]
        assert stopped.finish_reason == "stop"
        assert stop not in stopped.text and free.text.startswith(stopped.text)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=8, ignore_eos=True)
    a = llm.generate(["abc", "hello"], seeded)
    b = llm.generate(["hello"], seeded)
    assert a[1].output_token_ids == b[0].output_token_ids
    assert_all_free(llm)


def test_default_model_generates_offline():
    llm = LLM()
    try:
        out = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
        assert len(out.output_token_ids) == 5
        assert isinstance(out.text, str)
    finally:
        llm.shutdown()


def test_a_failing_request_fails_alone(llama_checkpoint, engines, monkeypatch):
    """A fault in one request's sampling ends that request with an error; the others in the same
    batch finish normally and the instance keeps serving."""
    import infinite_llm.instance.runner as runner

    real = runner.sample_tokens

    def faulty(logits, params, num_generated, generator):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling fault")
        return real(logits, params, num_generated, generator)

    monkeypatch.setattr(runner, "sample_tokens", faulty)
    llm = engines(llama_checkpoint)
    good = prompts(10, [9, 13])
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("good0", good[0], greedy)
    engine.add_request("bad", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, seed=666))
    engine.add_request("good1", good[1], greedy)
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["bad"].finish_reason == "abort" and "injected sampling fault" in final["bad"].error
    for i in (0, 1):
        assert final[f"good{i}"].output_token_ids == hf_greedy(llama_checkpoint, good[i], 6)
    again = llm.generate([good[0]], greedy)[0]  # still healthy
    assert again.output_token_ids == final["good0"].output_token_ids
    assert_all_free(llm)


def test_rebalancer_moves_blocks_only_when_memory_bound(llama_checkpoint, engines):
    """Live gManager plans: a home with requests waiting for memory gets blocks of its long
    request moved to a peer (outputs stay exact with those copies in flight); a cluster where
    everything fits moves nothing."""
    long, *short = prompts(11, [80, 30, 30, 30])
    llm = engines(llama_checkpoint, instances=2, blocks=12, rebalance_interval_s=0.05, heartbeat_interval_s=0.02,
                  debug_step_delay_s={0: 0.01})  # the long request lasts several plans
    engine = llm.engine
    engine.add_request("long", long, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), home=0)
    outputs: list = []
    _wait_first_token(engine, "long", outputs)  # the shorts then wait for memory, not for its prompt
    short_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(short):
        engine.add_request(f"s{i}", prompt, short_params, home=0)
    final = {o.request_id: o for o in outputs if o.finished}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["long"].output_token_ids == hf_greedy(llama_checkpoint, long, 40)
    for i, prompt in enumerate(short):
        assert final[f"s{i}"].output_token_ids == hf_greedy(llama_checkpoint, prompt, 8)
    assert sum(i.migrations.num_migrated_blocks for i in llm.engine.cluster.instances) > 0
    assert_all_free(llm)

    roomy = engines(llama_checkpoint, instances=2, blocks=64, rebalance_interval_s=0.05,
                    debug_step_delay_s={0: 0.01})
    roomy.generate(prompts(12, [80, 30, 30, 30]), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert sum(i.migrations.num_migrated_blocks for i in roomy.engine.cluster.instances) == 0


def test_a_request_that_fits_one_instance_reclaims_blocks_lent_to_one_that_does_not(llama_checkpoint, engines):
    """Instance 1 lent blocks to a request larger than an instance; a request homed on 1 that
    needs them gets them back (the long one is recomputed later), and both stay exact."""
    llm = engines(llama_checkpoint, instances=2, blocks=16, batched_tokens=64,
                  debug_step_delay_s={0: 0.02, 1: 0.02})  # the long one still runs when the short arrives
    engine = llm.engine
    long_prompt, short_prompt = prompts(31, [150, 110])
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.add_request("long", long_prompt, params, home=0)  # 19 prompt blocks > 16: borrows 3 from 1
    outputs: list = []
    _wait_first_token(engine, "long", outputs)
    lent = llm.engine.cluster.instances[1].rm.yielding_lent()
    assert lent.get("long", (0, 0))[1] >= 3
    engine.add_request("short", short_prompt, params, home=1)  # 14 prompt blocks: at most 13 are free
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    final = {o.request_id: o for o in outputs if o.finished}
    assert final["long"].output_token_ids == hf_greedy(llama_checkpoint, long_prompt, 16)
    assert final["short"].output_token_ids == hf_greedy(llama_checkpoint, short_prompt, 16)
    assert final["long"].num_preemptions >= 1  # it gave the blocks back
    assert final["short"].first_token_time < final["long"].finished_time  # short did not wait for long
    assert_all_free(llm)


def test_an_instance_that_joins_while_a_request_starves_holds_its_admissions_too(llama_checkpoint, engines,
                                                                                  monkeypatch):
    """The starving request's home tells a new instance of its hold (the broadcast went out
    before it existed), and the hold ends there too when the request runs."""
    from infinite_llm.control.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "STARVATION_PASSES", 1)
    holds: list[tuple[int, int, str, bool]] = []  # (instance told, home, request, on)
    set_peer_hold = Scheduler.set_peer_hold

    def recording(self, home, request_id, on):
        holds.append((self.kv.home, home, request_id, on))
        set_peer_hold(self, home, request_id, on)

    monkeypatch.setattr(Scheduler, "set_peer_hold", recording)
    llm = engines(llama_checkpoint, instances=2, blocks=12, debug_step_delay_s={0: 0.05})
    engine = llm.engine
    busy, long, short = prompts(42, [60, 150, 20])
    engine.add_request("busy", busy, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), home=0)
    outputs: list = []
    _wait_first_token(engine, "busy", outputs)
    engine.add_request("long", long, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), home=0)
    engine.add_request("short", short, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), home=0)
    deadline = time.monotonic() + 30
    while (1, 0, "long", True) not in holds:  # "short" went past "long": it starves
        assert time.monotonic() < deadline, f"the long request did not starve: {holds}"
        outputs.extend(engine.step(timeout_s=0.01))
    joined = engine.add_instance()
    final = {o.request_id: o for o in outputs if o.finished}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert (joined, 0, "long", True) in holds and (joined, 0, "long", False) in holds, holds
    assert holds.index((joined, 0, "long", True)) < holds.index((joined, 0, "long", False))
    for rid, prompt, n in (("busy", busy, 40), ("long", long, 6), ("short", short, 6)):
        assert final[rid].output_token_ids == hf_greedy(llama_checkpoint, prompt, n), rid
    assert_all_free(llm)


def test_a_starving_long_request_holds_its_peers_admissions_and_then_runs(llama_checkpoint, engines, monkeypatch):
    """A request larger than an instance that another was admitted past (here once is enough)
    starves: the home tells its peer (AdmissionHold), the peer holds its admissions until the
    long request runs, then lets them go; every output stays exact and nothing leaks."""
    from infinite_llm.control.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "STARVATION_PASSES", 1)
    llm = engines(llama_checkpoint, instances=2, blocks=12, debug_step_delay_s={0: 0.01, 1: 0.01})
    peer_holds: list[tuple[int, str, bool]] = []
    peer = llm.engine.cluster.instances[1].scheduler
    set_peer_hold = peer.set_peer_hold
    monkeypatch.setattr(peer, "set_peer_hold", lambda h, r, on: (peer_holds.append((h, r, on)), set_peer_hold(h, r, on)))
    engine = llm.engine
    busy, long, short, on_peer = prompts(41, [60, 150, 20, 20])
    params = {"busy": 24, "long": 6, "short": 6, "on_peer": 6}
    engine.add_request("busy", busy, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), home=0)
    outputs: list = []
    _wait_first_token(engine, "busy", outputs)  # 8 of home 0's 12 blocks
    engine.add_request("long", long, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), home=0)
    engine.add_request("short", short, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), home=0)
    engine.add_request("on_peer", on_peer, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), home=1)
    final = {o.request_id: o for o in outputs if o.finished}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, prompt in (("busy", busy), ("long", long), ("short", short), ("on_peer", on_peer)):
        assert final[rid].output_token_ids == hf_greedy(llama_checkpoint, prompt, params[rid]), rid
    assert peer_holds == [(0, "long", True), (0, "long", False)]
    assert_all_free(llm)


def test_new_requests_avoid_an_instance_busy_with_a_long_prompt(llama_checkpoint, engines):
    """The router sends short requests away from the home of a long prompt still being
    prefilled, both before that home reported it and once it did, though that home has more
    free blocks than the other instance (the rule before looked at free blocks first, and sent
    them behind the prompt); the outputs stay exact."""
    # Slowed steps: the reports see the long prompt half done (15 steps of 16 tokens), and the
    # request that fills instance 1 still decoding.
    llm = engines(llama_checkpoint, instances=2, blocks=64, placement="static", batched_tokens=16,
                  debug_step_delay_s={0: 0.05, 1: 0.02})
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    filler, long_prompt, first, second = prompts(11, [360, 240, 10, 12])
    outputs: dict[str, list] = {}

    def step_until(done) -> None:
        run_until(engine, lambda: done() or not engine.has_unfinished_requests(), outputs)
        assert done(), "everything finished first"

    # 48 of instance 1's 64 blocks (360 + 24 tokens), against 30 for the long prompt; its 24
    # decode steps outlast the wait for a report.
    engine.add_request("filler", filler, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), home=1)
    step_until(lambda: "filler" in outputs and engine.router.view()[1].load.prefill_backlog_tokens == 0)
    engine.add_request("long", long_prompt, params)
    engine.add_request("first", first, params)  # nothing reported yet: the long prompt counts as sent
    homes = dict(engine.router.homes)
    assert homes["long"] == 0  # the most free blocks, no prompt queued

    def reported() -> bool:
        load = engine.router.view()[0].load
        return load.num_received >= 1 and load.prefill_backlog_tokens > 16

    step_until(reported)
    engine.add_request("second", second, params)
    assert homes["first"] == 1 and engine.router.homes["second"] == 1
    final = drain(engine, outputs)
    for request_id, prompt, n in (("filler", filler, 24), ("long", long_prompt, 6), ("first", first, 6),
                                  ("second", second, 6)):
        assert final[request_id].output_token_ids == hf_greedy(llama_checkpoint, prompt, n)
    assert_all_free(llm)


@pytest.mark.parametrize("instances", [1, 2])
def test_a_newcomer_calls_off_a_prompt_step_running_alone_and_both_stay_exact(llama_checkpoint, engines,
                                                                               instances):
    """A prompt alone runs whole-budget steps; a request arriving during one calls it off at the
    next check (no decode step measured yet: any wait is too long), and the chunk is redone.
    With 2 instances the long prompt's KV spans both, so holders' late partials are dropped too."""
    long_prompt, short_prompt = prompts(11, [150, 7])
    llm = engines(llama_checkpoint, instances=instances, blocks=12 if instances == 2 else 64, batched_tokens=64)
    engine = llm.engine
    home = engine.cluster.instances[0]
    waiting, newcomer_in = threading.Event(), threading.Event()
    real = home._newcomer_calls_off

    def pause_first_lone_step(started):
        called_off = real(started)
        if waiting.is_set():
            return called_off

        def held(layers_done):  # hold the first lone step after a layer until the newcomer is in
            if layers_done >= 1 and not waiting.is_set():
                waiting.set()
                assert newcomer_in.wait(10)
                deadline = time.monotonic() + 10
                while home._num_arrived == home._num_taken_in:
                    assert time.monotonic() < deadline, "the newcomer never reached the instance"
                    time.sleep(0.001)
            return called_off(layers_done)

        return held

    home._newcomer_calls_off = pause_first_lone_step
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("long", long_prompt, params, home=0)
    outputs: dict = {}
    run_until(engine, waiting.is_set, outputs)
    engine.add_request("short", short_prompt, params, home=0)
    newcomer_in.set()
    final = drain(engine, outputs)
    assert home.num_called_off == 1
    assert final["long"].output_token_ids == hf_greedy(llama_checkpoint, long_prompt, 8)
    assert final["short"].output_token_ids == hf_greedy(llama_checkpoint, short_prompt, 8)
    assert_all_free(llm)
    if instances == 2:
        assert not home.mailbox._partials, "a called-off step's partials were left behind"
