"""Scheduler: one instance's admission, batching, chunked prefill and preemption, over its own
HomeKV (cluster_harness: its rManager borrows from peers by message). No tensors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.plan import SampleResult
from infinite_llm.control.request import FinishReason, RequestStatus
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError, Scheduler

from tests.control.cluster_harness import Cluster, make_request as req


def make(num_instances=1, blocks=16, block_size=4, placement="infinite", budget=16, max_seqs=8, max_waiting=100,
         threshold=None, seed=0, headroom=0.0, lend_fraction=1.0, spanning_every=16):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_waiting=max_waiting,
                             long_prefill_token_threshold=threshold, headroom_fraction=headroom,
                             spanning_prefill_every=spanning_every)
    return Cluster(num_instances, blocks, block_size, placement, lend_fraction=lend_fraction, seed=seed,
                   scheduler=config, headroom_fraction=headroom)


def run_step(s: Scheduler, token=7, now=0.0):
    out = s.schedule()
    s.update(out, [SampleResult(w.request_id, token) for w in out.batch if w.sample], now=now)
    return out


def used(c):
    return sum(c.used_blocks())


# --------------------------------------------------------------------------- batching
def test_chunked_prefill_respects_budget_and_positions():
    s = make(budget=8)[0].scheduler
    s.add_request(req("a", 20))
    starts = []
    while s.requests["a"].num_computed_tokens < 20:
        out = run_step(s)
        (w,) = out.batch
        assert len(w.token_ids) <= 8 and w.token_ids == list(range(1, 21))[w.start_pos:w.end_pos]
        assert len(w.block_table) * 4 >= w.end_pos
        starts.append(w.start_pos)
        assert w.sample == (w.end_pos == 20)
    assert starts == [0, 8, 16]
    assert s.requests["a"].output_token_ids == [7]
    out = run_step(s)  # then one decode token, at position 20
    assert [(w.start_pos, w.token_ids, w.num_generated) for w in out.batch] == [(20, [7], 1)]


def test_decode_batches_all_running_requests():
    s = make(budget=64)[0].scheduler
    for i in range(3):
        s.add_request(req(f"r{i}", 5))
    run_step(s)  # all three prefilled in one step
    out = run_step(s)
    assert sorted(w.request_id for w in out.batch) == ["r0", "r1", "r2"]
    assert all(len(w.token_ids) == 1 and w.sample for w in out.batch)


def test_max_num_seqs_caps_the_batch():
    s = make(budget=64, max_seqs=2)[0].scheduler
    for i in range(3):
        s.add_request(req(f"r{i}", 4))
    out = run_step(s)
    assert [w.request_id for w in out.batch] == ["r0", "r1"] and s.num_waiting == 1


def test_decodes_are_not_starved_behind_a_prefill_and_long_prefill_threshold():
    s = make(blocks=64, budget=16, threshold=8)[0].scheduler
    s.add_request(req("long", 100, max_tokens=2))
    s.add_request(req("short", 4, max_tokens=60))
    out = run_step(s)
    assert [(w.request_id, len(w.token_ids)) for w in out.batch] == [("long", 8), ("short", 4)]
    # Without the threshold, the running prompt still shrinks to a quarter of the budget while a
    # request decodes behind it, and always leaves that request its token.
    s.config.long_prefill_token_threshold = None
    while s.requests["long"].num_computed_tokens < 100:
        out = run_step(s)
        chunks = {w.request_id: len(w.token_ids) for w in out.batch}
        assert chunks["short"] == 1
        assert chunks["long"] <= 16 // 4
    assert len(s.requests["short"].output_token_ids) >= 7
    s.add_request(req("next", 30))
    run_step(s)  # admitted with a first chunk; the rest is a running prompt
    s.prefill_chunk_cap = 0  # the pacer asks for a decode-only step
    out = run_step(s)
    assert "next" not in {w.request_id for w in out.batch}
    assert all(len(w.token_ids) == 1 for w in out.batch)


def test_a_step_that_admits_newcomers_carries_no_chunk_of_an_older_prompt():
    s = make(blocks=64, budget=16)[0].scheduler
    s.add_request(req("long", 100, max_tokens=2))
    run_step(s)  # the long prompt's first chunk: it is running now
    s.add_request(req("a", 4, max_tokens=8))
    out = run_step(s)
    assert [w.request_id for w in out.batch] == ["a"]  # a's first token waits for its own prefill only
    s.add_request(req("b", 4, max_tokens=8))
    out = run_step(s)  # never twice in a row: the long prompt advances while b is admitted
    assert {w.request_id for w in out.batch} == {"long", "a", "b"}
    out = run_step(s)  # nothing admitted: as before
    assert {w.request_id for w in out.batch} == {"long", "a", "b"}


def test_recomputing_request_is_not_treated_as_decoding():
    c = make(budget=16)
    assert not Scheduler._is_decoding(req("fresh", 5))
    r = req("r", 5)
    r.output_token_ids = [1, 2, 3]
    r.num_computed_tokens = 7  # prompt and two outputs computed: only the newest token is left
    assert Scheduler._is_decoding(r)
    r.num_computed_tokens = 0  # preempted: everything is recomputed in chunks
    assert not Scheduler._is_decoding(r)
    for bad in (dict(long_prefill_token_threshold=0), dict(max_num_seqs=0), dict(max_num_batched_tokens=0),
                dict(max_waiting=0)):
        with pytest.raises(ValueError):
            Scheduler(SchedulerConfig(**bad), c[0].kv, 100)


# --------------------------------------------------------------------------- memory
def test_admission_takes_the_whole_prompt_so_prompts_do_not_preempt_each_other():
    c = make(blocks=16, block_size=4, budget=8)
    s = c[0].scheduler
    s.add_request(req("a", 40, max_tokens=4))  # 10 blocks of prompt
    s.add_request(req("b", 40, max_tokens=4))
    run_step(s)
    assert used(c) == 10  # all of a's prompt, though only 8 tokens are computed
    assert [r.request_id for r in s.running] == ["a"]  # b's prompt does not fit beside it
    while s.has_unfinished():
        run_step(s)
        for r in list(s.requests.values()):
            if r.is_finished:
                s.pop_finished(r.request_id)
    # Admitted chunk by chunk, both prompts would have filled the 16 blocks halfway and one
    # would have been preempted, its computed chunks lost.
    assert s.num_preemptions == 0 and used(c) == 0


def test_preemption_by_recompute_newest_first_frees_blocks():
    # 6 blocks of 4 tokens = 24 slots; three requests of 8 prompt tokens need 3x(8+4) = 36.
    c = make(blocks=6, budget=64)
    s = c[0].scheduler
    for i in range(3):
        s.add_request(req(f"r{i}", 8, max_tokens=4, t=i))
    run_step(s)  # 8 prompt tokens each: 2 blocks each, the pool is full
    assert used(c) == 6 and s.num_running == 3
    out = run_step(s)  # every decode needs a third block
    (victim,) = out.preempted
    assert victim.request_id == "r2"  # the newest running request, never the oldest
    assert victim.status == RequestStatus.WAITING and victim.num_computed_tokens == 0
    assert victim.num_preemptions == 1 and s.waiting[0] is victim  # first in line again
    assert c[0].kv.block_table("r2") == []  # its blocks went to the older requests
    assert [len(c[0].kv.block_table(r)) for r in ("r0", "r1")] == [3, 3] and used(c) == 6
    assert [w.request_id for w in out.batch] == ["r0", "r1"]
    preempted = [victim.request_id]
    for _ in range(40):
        if not s.has_unfinished():
            break
        preempted += [r.request_id for r in run_step(s).preempted]
    assert not s.has_unfinished()
    assert "r0" not in preempted
    for r in s.requests.values():
        assert r.output_token_ids == [7] * 4
    assert used(c) == 0


def test_a_remote_borrow_lets_a_prompt_larger_than_its_instance_run():
    c = make(num_instances=2, blocks=4, budget=64)
    s = c[0].scheduler
    s.add_request(req("big", 24, max_tokens=2))  # 6 blocks > 4: spread level, 3 at home, 3 borrowed
    run_step(s)
    assert c[0].kv.holders("big") == {0: 3, 1: 3}
    while s.has_unfinished():
        run_step(s)
    c.check()
    assert c.used_blocks() == [0, 0]


class RecordingPacer:
    def __init__(self):
        self.calls = []

    def next_cap(self, has_decodes, contended, shared):
        self.calls.append((has_decodes, contended, shared))
        return None


def test_a_prompt_is_paced_as_shared_while_it_spans_instances_or_its_instance_lends():
    c = make(num_instances=2, blocks=4, budget=8)
    pacer = RecordingPacer()
    c[0].scheduler.add_request(req("big", 24, max_tokens=2))  # 3 blocks at home, 3 borrowed from 1
    run_step(c[0].scheduler)
    c[0].scheduler.pace_prefill(pacer)
    c[1].scheduler.add_request(req("small", 4, max_tokens=2))  # instance 1 lends to "big"
    run_step(c[1].scheduler)
    c[1].scheduler.pace_prefill(pacer)  # small decodes; instance 1 holds KV of big
    assert pacer.calls == [(False, False, True), (True, True, True)]
    alone = make(num_instances=2, blocks=8, budget=8)
    alone[0].scheduler.add_request(req("local", 24, max_tokens=2))
    run_step(alone[0].scheduler)
    alone[0].scheduler.pace_prefill(pacer)
    assert pacer.calls[-1] == (False, False, False)  # all its KV at home, nothing lent: alone


# --------------------------------------------------------------------------- admission errors
def test_admission_errors():
    c = make(blocks=4, block_size=4, placement="static", max_waiting=1)
    s = c[0].scheduler
    assert s.max_context() == 16
    with pytest.raises(RequestTooLongError, match="static"):
        s.add_request(req("long", 15, max_tokens=4))
    with pytest.raises(ValueError):
        s.add_request(req("empty", 0))
    s.add_request(req("ok", 3))
    with pytest.raises(QueueFullError):
        s.add_request(req("ok2", 3))
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(req("ok", 3))


def test_max_context_follows_the_policy():
    assert make(num_instances=3, blocks=4, placement="static")[0].scheduler.max_context() == 16
    assert make(num_instances=3, blocks=4, placement="striped")[0].scheduler.max_context() == 48
    assert make(num_instances=3, blocks=4, placement="infinite")[0].scheduler.max_context() == 48
    r = req("r", 10, max_tokens=None)
    s = make(num_instances=1, blocks=4)[0].scheduler
    s.add_request(r)
    assert r.max_total_tokens == 16 and r.max_output_tokens == 6  # capped to what fits


# --------------------------------------------------------------------------- finishing
def test_abort_frees_local_and_remote_blocks_and_is_idempotent():
    c = make(num_instances=2, blocks=4, budget=64)
    s = c[0].scheduler
    s.add_request(req("a", 20))  # 5 blocks > 4: spread level
    run_step(s)
    assert c.used_blocks() == [3, 2]
    assert s.abort("a") is not None
    assert s.abort("a") is None
    assert s.requests["a"].status == RequestStatus.FINISHED
    assert s.requests["a"].finish_reason == FinishReason.ABORT
    c.drain()
    assert c.used_blocks() == [0, 0]
    s.add_request(req("w", 4))
    assert s.abort("w").finish_reason == FinishReason.ABORT  # a waiting request too
    assert not s.has_unfinished()
    c.check()


def test_stop_reasons_and_failed_samples():
    c = make(budget=64)
    s = c[0].scheduler
    s.eos_token_ids = frozenset({2})
    stop = req("stop", 4, max_tokens=10)
    stop.sampling.stop_token_ids = [9]
    eos = req("eos", 4, max_tokens=10)
    eos.sampling.ignore_eos = False
    length = req("len", 4, max_tokens=1)
    bad = req("bad", 4)
    for r in (stop, eos, length, bad):
        s.add_request(r)
    out = s.schedule()
    tokens = {"stop": 9, "eos": 2, "len": 5}
    results = [SampleResult(w.request_id, tokens.get(w.request_id, 0),
                            error="boom" if w.request_id == "bad" else None) for w in out.batch]
    progressed = s.update(out, results, now=3.0)
    assert {r.request_id for r in progressed} == {"stop", "eos", "len", "bad"}
    assert stop.finish_reason == FinishReason.STOP and eos.finish_reason == FinishReason.STOP
    assert length.finish_reason == FinishReason.LENGTH and bad.finish_reason == FinishReason.ABORT
    assert bad.output_token_ids == [] and stop.finished_time == 3.0 and stop.first_token_time == 3.0
    assert not s.has_unfinished() and used(c) == 0


def test_an_abort_while_the_step_runs_is_not_undone_by_its_results():
    s = make(budget=64)[0].scheduler
    s.add_request(req("a", 4))
    out = s.schedule()
    s.abort("a")
    assert s.update(out, [SampleResult("a", 5)], now=0.0) == []
    assert s.requests["a"].output_token_ids == []
    s.pop_finished("a")
    assert "a" not in s.requests


# --------------------------------------------------------------------------- load
def test_load_figures():
    c = make(blocks=8, budget=64)
    s = c[0].scheduler
    s.add_request(req("a", 20, max_tokens=8))  # 5 blocks
    s.add_request(req("b", 16, max_tokens=8))  # 4 blocks: does not fit beside a
    s.add_request(req("c", 2))
    load = s.load()
    assert (load.batch_size, load.num_waiting, load.waiting_tokens, load.running_tokens) == (0, 3, 38, 0)
    assert load.prefill_backlog_tokens == 19 + 15 + 1  # each prompt but the token it samples from
    assert load.num_received == 3
    assert load.num_waiting_for_memory == 0  # nothing tried yet
    run_step(s)
    load = s.load()
    assert (load.batch_size, load.num_waiting, load.waiting_tokens, load.running_tokens) == (1, 2, 18, 21)
    assert load.prefill_backlog_tokens == 15 + 1  # a decodes: nothing of it is queued
    assert load.num_waiting_for_memory == 2  # b did not fit: everyone behind it waits for memory


def test_preempted_requests_count_as_waiting_for_memory():
    c = make(blocks=6, budget=64)
    s = c[0].scheduler
    for i in range(3):
        s.add_request(req(f"r{i}", 8, max_tokens=4, t=i))
    for _ in range(3):
        run_step(s)
    assert s.num_preemptions >= 1
    assert s.load().num_waiting_for_memory == s.num_waiting >= 1


# --------------------------------------------------------------------------- independence
def test_each_instance_has_its_own_budget_and_batch():
    c = make(num_instances=2, blocks=8, budget=8)
    a, b = c[0].scheduler, c[1].scheduler
    a.add_request(req("long", 40, max_tokens=2))  # 10 blocks > 8: spread level over both
    b.add_request(req("short", 4, max_tokens=3))
    out_a = run_step(a)
    assert [(w.request_id, len(w.token_ids)) for w in out_a.batch] == [("long", 8)]
    assert c[0].kv.holders("long") == {0: 5, 1: 5}
    # Instance 1 lent blocks but runs its own requests with its own full budget, whatever 0 does.
    out_b = run_step(b)
    assert [(w.request_id, len(w.token_ids)) for w in out_b.batch] == [("short", 4)]
    assert all(w.request_id == "long" for w in run_step(a).batch)
    assert b.load().batch_size == 1 and a.load().batch_size == 1
    c.check()


# --------------------------------------------------------------------------- random workloads
@settings(max_examples=150, deadline=None)
@given(
    num_instances=st.integers(1, 3),
    placement=st.sampled_from(["static", "striped", "infinite"]),
    # Prompts up to 60 tokens: some are larger than one instance's 40.
    shapes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 60), st.integers(1, 6)), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
    headroom=st.sampled_from([0.0, 0.25, 0.5]),
    lend_fraction=st.sampled_from([1.0, 0.7]),
    starvation_passes=st.sampled_from([128, 1]),
)
def test_random_workloads_finish_without_leaks(num_instances, placement, shapes, seed, headroom, lend_fraction,
                                              starvation_passes):
    """Each instance's scheduler stepped in a random interleaving, with random aborts: tables
    cover every chunk, the cluster invariants hold, nobody livelocks or waits forever (for
    headroom either), nothing leaks."""
    c = make(num_instances=num_instances, blocks=10, block_size=4, placement=placement, budget=12, seed=seed,
             headroom=headroom, lend_fraction=lend_fraction)
    for node in c.nodes:
        node.scheduler.STARVATION_PASSES = starvation_passes
    rng = random.Random(seed)
    accepted = []
    for i, (home, prompt_len, max_tokens) in enumerate(shapes):
        request = req(f"r{i}", prompt_len, max_tokens)
        try:
            c[home % num_instances].scheduler.add_request(request)
            accepted.append(request)
        except RequestTooLongError:
            pass
    for _ in range(3000):
        live = [node.scheduler for node in c.nodes if node.scheduler.has_unfinished()]
        if not live:
            break
        s = rng.choice(live)
        if rng.random() < 0.05 and s.running:
            s.abort(rng.choice(s.running).request_id)
        out = run_step(s)
        for request_id, on in s.take_holds():  # admission holds reach the peers
            for node in c.nodes:
                if node.scheduler is not s:
                    node.scheduler.set_peer_hold(s.kv.home, request_id, on)
        for w in out.batch:
            assert len(w.block_table) * 4 >= w.end_pos
        if rng.random() < 0.3:
            c.check()
    assert not any(node.scheduler.has_unfinished() for node in c.nodes), "a scheduler livelocked"
    c.check()
    assert c.used_blocks() == [0] * num_instances
    for r in accepted:
        assert r.finish_reason is not None
        if r.finish_reason == FinishReason.LENGTH:
            assert len(r.output_token_ids) == r.sampling.max_tokens


def test_a_resumed_request_is_admitted_past_a_full_waiting_queue():
    sched = make(max_waiting=1)[0].scheduler
    sched.add_request(req("a", 4))
    with pytest.raises(QueueFullError):
        sched.add_request(req("b", 4))
    sched.add_request(req("c", 4), enforce_queue_limit=False)
    assert [r.request_id for r in sched.waiting] == ["a", "c"]


# --------------------------------------------------------------------------- long requests yield
def test_a_request_larger_than_its_instance_does_not_hold_up_those_behind_it():
    c = make(num_instances=2, blocks=8, budget=64)
    s = c[0].scheduler
    c[1].kv.allocate("peer-full", 8 * 4)  # nothing left to lend: "long" cannot start
    s.add_request(req("long", 40, max_tokens=4))  # 11 blocks > 8: must borrow
    s.add_request(req("short", 8, max_tokens=2))  # fits at home: goes ahead
    s.add_request(req("big", 28, max_tokens=2))  # 8 blocks: does not fit beside short, waits
    run_step(s)
    assert [r.request_id for r in s.running] == ["short"]
    assert [r.request_id for r in s.waiting] == ["long", "big"]
    assert c[0].rm.lending_paused  # "big" fits this instance: its memory is not lent away


@pytest.mark.parametrize("every", [1, 4])
def test_a_prompt_larger_than_its_instance_shares_a_step_with_others_once_every_n_steps(every):
    c = make(num_instances=2, blocks=16, budget=8, spanning_every=every)
    s = c[0].scheduler
    s.add_request(req("long", 72, max_tokens=2))  # 18 blocks > 16: spans both instances
    assert [w.request_id for w in run_step(s).batch] == ["long"]  # alone: its chunk runs
    s.add_request(req("short", 4, max_tokens=16))
    assert [w.request_id for w in run_step(s).batch] == ["short"]  # admitted (older chunks held back)
    carried = []  # per step with short decoding: whether a chunk of long's prompt ran beside it
    while "short" in s.requests and not s.requests["short"].is_finished:
        ids = [w.request_id for w in run_step(s).batch]
        carried.append("long" in ids)
    assert carried == [i % every == every - 1 for i in range(len(carried))]  # slowed, not starved
    while s.has_unfinished():  # short is done: long's chunks take every step
        assert [w.request_id for w in run_step(s).batch] == ["long"]
    c.check()
    assert c.used_blocks() == [0, 0]


def test_a_normal_head_stops_admission_as_before():
    c = make(blocks=8, budget=64)
    s = c[0].scheduler
    s.add_request(req("a", 20, max_tokens=8))  # 6 blocks with its output
    s.add_request(req("b", 16, max_tokens=8))  # does not fit beside a
    s.add_request(req("c", 2))  # would fit, but first come first served
    run_step(s)
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_blocks_lent_to_a_request_larger_than_an_instance_are_reclaimed_for_one_that_fits():
    c = make(num_instances=2, blocks=8, budget=64)
    long = c[0].scheduler
    long.add_request(req("long", 44, max_tokens=4))  # 11 blocks: 6 at home + 5 lent by instance 1
    run_step(long)
    assert c[1].rm.yielding_lent() == {"long": (0, 5)}
    s = c[1].scheduler
    s.add_request(req("fits", 24, max_tokens=4))  # 7 blocks: 3 are free on instance 1
    run_step(s)
    assert s.take_reclaims() == [(0, "long")]
    assert s.take_reclaims() == []  # asked once
    assert long.reclaim("long") is not None  # the home gives the blocks back
    c.drain()
    run_step(s)
    assert [r.request_id for r in s.running] == ["fits"]


def test_a_normal_borrower_is_not_reclaimed():
    c = make(num_instances=2, blocks=8, budget=64)
    a = c[0].scheduler
    c[0].kv.allocate("filler", 6 * 4)
    a.add_request(req("normal", 16, max_tokens=4))  # 4 blocks: 2 at home, 2 borrowed, < 8 in all
    run_step(a)
    assert c[1].rm.num_lent == 2 and c[1].rm.yielding_lent() == {}
    s = c[1].scheduler
    s.add_request(req("fits", 28, max_tokens=4))  # 7 blocks, 6 free: waits for "normal" to end
    run_step(s)
    assert s.take_reclaims() == []


def test_a_long_request_passed_too_often_starves_and_its_peers_hold_admissions():
    """A request larger than an instance that many were admitted past stops yielding: no more
    pass it, every peer admits nothing new until it runs, then they go on."""
    c = make(num_instances=2, blocks=8, block_size=4, budget=64, headroom=0.25)
    home, peer = c[0].scheduler, c[1].scheduler
    home.STARVATION_PASSES = 2
    peer.add_request(req("busy", 16, max_tokens=40))  # 4 of the peer's 8 blocks, for a while
    run_step(peer)
    home.add_request(req("long", 40, max_tokens=2))  # 10 blocks > 8; 6 + 2 past the headroom: waits
    for i in range(2):
        home.add_request(req(f"s{i}", 4, max_tokens=30))
        assert {w.request_id for w in run_step(home).batch} >= {f"s{i}"}  # admitted past it
    assert home.starving == {"long"} and home.take_holds() == [("long", True)]
    peer.set_peer_hold(0, "long", True)
    home.add_request(req("s2", 4, max_tokens=2))
    peer.add_request(req("p", 4, max_tokens=2))
    assert "s2" not in {w.request_id for w in run_step(home).batch}  # nothing passes it now
    assert "p" not in {w.request_id for w in run_step(peer).batch}  # the peer holds its admissions
    while "long" not in {r.request_id for r in home.running}:
        run_step(home)
        run_step(peer)
    assert home.take_holds() == [("long", False)] and not home.starving
    peer.set_peer_hold(0, "long", False)
    while peer.has_unfinished() or home.has_unfinished():
        run_step(home)
        run_step(peer)
    assert all(home.requests[r].finish_reason is not None for r in ("long", "s2"))
    assert peer.requests["p"].finish_reason is not None
    c.check()
    assert c.used_blocks() == [0, 0]
