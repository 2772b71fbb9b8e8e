"""Scheduler unit tests, with the real cluster KV manager and no tensors."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.plan import SampleResult
from infinite_llm.control.request import Request, RequestStatus
from infinite_llm.control.scheduler import QueueFullError, RequestTooLongError, Scheduler
from infinite_llm.sampling import SamplingParams


def make(num_instances=1, blocks=16, block_size=4, placement="infinite", budget=16, max_seqs=8, max_waiting=100):
    kv = ClusterKVManager(num_instances, blocks, block_size, placement=placement)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_waiting=max_waiting), kv)


def req(rid, prompt_len, max_tokens=4, t=0.0):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), t, 10**9)


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    results = [SampleResult(w.request_id, token) for w in out.plan.seqs if w.sample]
    s.update(out, results, now=0.0)
    return out


def test_chunked_prefill_respects_budget_and_positions():
    s = make(budget=8)
    s.add_request(req("a", 20))
    starts = []
    while s.requests["a"].num_computed_tokens < 20:
        out = run_step(s)
        (w,) = out.plan.seqs
        assert len(w.token_ids) <= 8
        starts.append(w.start_pos)
        assert w.sample == (w.end_pos == 20)
    assert starts == [0, 8, 16]
    assert s.requests["a"].output_token_ids == [7]


def test_decode_batches_all_running_requests():
    s = make(budget=64)
    for i in range(3):
        s.add_request(req(f"r{i}", 5))
    run_step(s)  # all three prefilled in one step
    out = run_step(s)
    assert sorted(w.request_id for w in out.plan.seqs) == ["r0", "r1", "r2"]
    assert all(len(w.token_ids) == 1 for w in out.plan.seqs)


def test_long_prefill_threshold_admits_others_and_decodes_never_stall():
    s = make(blocks=64, budget=16)
    s.config.long_prefill_token_threshold = 8
    s.add_request(req("long", 100, max_tokens=2))
    s.add_request(req("short", 4, max_tokens=20))
    out = run_step(s)
    assert [(w.request_id, len(w.token_ids)) for w in out.plan.seqs] == [("long", 8), ("short", 4)]
    # Without the cap the older prefill would take the whole budget; it still leaves one token
    # for the decoding request behind it.
    s.config.long_prefill_token_threshold = None
    while s.requests["long"].num_computed_tokens < 100:
        out = run_step(s)
        chunks = {w.request_id: len(w.token_ids) for w in out.plan.seqs}
        assert chunks["short"] == 1
        assert chunks["long"] <= 15
    assert len(s.requests["short"].output_token_ids) >= 7


def test_recomputing_request_is_not_treated_as_decoding():
    s = make(budget=16)
    assert not Scheduler._is_decoding(req("fresh", 5))
    r = req("r", 5)
    r.output_token_ids = [1, 2, 3]
    r.num_computed_tokens = 7  # prompt and two outputs computed: only the newest token is left
    assert Scheduler._is_decoding(r)
    r.num_computed_tokens = 0  # preempted: everything is recomputed in chunks
    assert not Scheduler._is_decoding(r)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        Scheduler(SchedulerConfig(long_prefill_token_threshold=0), s.kv)


def test_admission_takes_the_whole_prompt_so_prompts_do_not_preempt_each_other():
    s = make(blocks=16, block_size=4, budget=8)
    s.add_request(req("a", 40, max_tokens=4))  # 10 blocks of prompt
    s.add_request(req("b", 40, max_tokens=4))
    run_step(s)
    assert s.kv.num_used_blocks() == 10  # all of a's prompt, though only 8 tokens are computed
    assert [r.request_id for r in s.running] == ["a"]  # b's prompt does not fit beside it
    while s.has_unfinished():
        run_step(s)
        for r in list(s.requests.values()):
            if r.is_finished:
                s.pop_finished(r.request_id)
    # Admitted chunk by chunk, both prompts would have filled the 16 blocks halfway and one
    # would have been preempted, its computed chunks lost.
    assert s.num_preemptions == 0


def test_preemption_by_recompute_newest_first():
    # 6 blocks of 4 tokens = 24 slots; three requests of 8 prompt tokens need 3x(8+4) = 36.
    s = make(blocks=6, budget=64)
    for i in range(3):
        s.add_request(req(f"r{i}", 8, max_tokens=4, t=i))
    preempted = []
    for _ in range(40):
        if not s.has_unfinished():
            break
        preempted += [r.request_id for r in run_step(s).preempted]
    assert not s.has_unfinished()
    assert preempted and "r0" not in preempted  # the oldest request is never the victim
    for r in s.requests.values():
        assert r.output_token_ids == [7] * 4
    assert s.kv.num_used_blocks(0) == 0


def test_admission_errors():
    s = make(blocks=4, block_size=4, placement="static", max_waiting=1)
    with pytest.raises(RequestTooLongError):
        s.add_request(req("long", 15, max_tokens=4))
    with pytest.raises(ValueError):
        s.add_request(req("empty", 0))
    s.add_request(req("ok", 3))
    with pytest.raises(QueueFullError):
        s.add_request(req("ok2", 3))
    with pytest.raises(ValueError):
        s.add_request(req("ok", 3))  # duplicate id


def test_abort_frees_blocks_and_is_idempotent():
    s = make(num_instances=2, blocks=4, budget=64)
    s.add_request(req("a", 20))
    run_step(s)
    assert s.kv.num_used_blocks(0) + s.kv.num_used_blocks(1) == 5
    assert s.abort("a") is not None
    assert s.abort("a") is None
    assert s.kv.num_used_blocks(0) + s.kv.num_used_blocks(1) == 0
    assert s.requests["a"].status == RequestStatus.FINISHED


def test_least_loaded_dispatch_spreads_homes():
    s = make(num_instances=3, blocks=16, budget=64)
    for i in range(3):
        s.add_request(req(f"r{i}", 8))
    out = s.schedule()
    assert sorted(w.home for w in out.plan.seqs) == [0, 1, 2]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.sampled_from(["static", "striped", "infinite"]),
    st.lists(st.tuples(st.integers(1, 30), st.integers(1, 6)), min_size=1, max_size=8),
    st.integers(0, 2**16),
)
def test_random_workloads_finish_without_leaks(num_instances, placement, shapes, seed):
    s = make(num_instances=num_instances, blocks=10, block_size=4, placement=placement, budget=12)
    rng = random.Random(seed)
    accepted = []
    for i, (prompt_len, max_tokens) in enumerate(shapes):
        try:
            s.add_request(req(f"r{i}", prompt_len, max_tokens))
            accepted.append((f"r{i}", max_tokens))
        except RequestTooLongError:
            pass
    for _ in range(2000):
        if not s.has_unfinished():
            break
        if rng.random() < 0.05 and s.running:
            s.abort(rng.choice(s.running).request_id)
        out = run_step(s)
        s.kv.check_invariants()
        # Every scheduled chunk's table covers its tokens.
        for w in out.plan.seqs:
            assert len(w.block_table) * 4 >= w.end_pos
    assert not s.has_unfinished(), "scheduler livelocked"
    for i in range(num_instances):
        assert s.kv.num_used_blocks(i) == 0
    for rid, max_tokens in accepted:
        r = s.requests[rid]
        assert r.finish_reason is not None
        if r.finish_reason.value == "length":
            assert len(r.output_token_ids) == max_tokens
