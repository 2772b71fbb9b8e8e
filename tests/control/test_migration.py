"""MigrationCoordinator: reserve-first, full blocks only, rate-limited (no torch)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.migration import MigrationCoordinator, _Order, default_perf_model
from infinite_llm.control.plan import SampleResult
from infinite_llm.control.request import Request
from infinite_llm.control.scheduler import RequestTooLongError, Scheduler
from infinite_llm.sampling import SamplingParams


def _setup(blocks=16, tokens_per_step=8, block_size=4):
    kv = ClusterKVManager(2, blocks, block_size, lend_fraction=1.0, placement="infinite")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    coord = MigrationCoordinator(kv, default_perf_model(None), interval_steps=10**9, tokens_per_step=tokens_per_step)
    sched.add_request(Request("r", list(range(1, 31)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), 0.0, 10**9))
    out = sched.schedule()
    sched.update(out, [SampleResult("r", 5)], now=0.0)
    return kv, sched, coord


def test_copies_are_issued_within_rate_limit_and_committed_next_step():
    kv, sched, coord = _setup(tokens_per_step=8)  # 8 tokens / 4 per block = 2 blocks per step
    home = sched.requests["r"].home
    coord.orders = [_Order("r", src=home, dst=1 - home, blocks_left=5)]
    before = kv.block_table("r")
    moves = coord.issue_copies(sched, step=1)
    assert len(moves) == 2
    # Issued, not committed: the step that copies still reads the sources.
    assert kv.block_table("r") == before
    assert set(kv.reservations("r")) == {m.dst for m in moves}
    full = sched.requests["r"].num_computed_tokens // kv.block_size
    for m in moves:
        assert m.src.instance == home and m.dst.instance == 1 - home
        assert before.index(m.src) < full  # only full, immutable blocks move
    kv.check_invariants()
    with pytest.raises(RuntimeError, match="commit_copies"):
        coord.issue_copies(sched, step=2)

    assert coord.commit_copies(sched) == 2
    table = kv.block_table("r")
    for m in moves:
        assert table[before.index(m.src)] == m.dst
    assert kv.reservations("r") == []
    assert kv.num_used_blocks(home) == len(before) - 2
    kv.check_invariants()
    assert len(coord.issue_copies(sched, step=2)) == 2
    coord.commit_copies(sched)
    assert len(coord.issue_copies(sched, step=3)) == 1  # order exhausted after 5 blocks
    coord.commit_copies(sched)
    assert coord.num_migrated_blocks == 5


def test_copy_of_a_request_that_finished_before_the_commit_is_dropped():
    kv, sched, coord = _setup()
    home = sched.requests["r"].home
    coord.orders = [_Order("r", src=home, dst=1 - home, blocks_left=2)]
    assert len(coord.issue_copies(sched, step=1)) == 2
    sched.abort("r")  # frees its blocks and its reservations
    coord.forget("r")
    assert coord.commit_copies(sched) == 0
    assert coord.num_dropped_copies == 2 and coord.num_migrated_blocks == 0
    assert kv.num_used_blocks() == 0
    kv.check_invariants()


def test_failed_reservation_drops_order_until_next_round():
    kv, sched, coord = _setup()
    home = sched.requests["r"].home
    other = 1 - home
    # Fill the target completely so the reservation cannot succeed.
    kv.allocate("filler", other, kv.block_size * kv.rmanagers[other].pool.num_free)
    coord.orders = [_Order("r", src=home, dst=other, blocks_left=3)]
    before = kv.block_table("r")
    assert coord.issue_copies(sched, step=1) == []
    assert coord.num_failed_reservations == 1 and coord.orders == []
    assert coord.commit_copies(sched) == 0
    assert kv.block_table("r") == before
    kv.check_invariants()


def test_view_sends_undispatched_waiting_requests_where_dispatch_would():
    kv, sched, coord = _setup(blocks=16)
    home = sched.requests["r"].home  # r holds 8 of its home's 16 blocks
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i, n in enumerate((20, 20, 20)):  # 5 blocks each
        sched.add_request(Request(f"w{i}", list(range(1, n + 1)), params, 0.0, 10**9))
    views, requests = coord.cluster_view(sched)
    other = 1 - home
    # 16 free vs 8 free: w0 and w1 go to the empty instance (16 -> 11 -> 6), then w2 to r's home
    # (8 free > 6).
    assert views[other].num_waiting_for_memory == 2
    assert views[home].num_waiting_for_memory == 1
    assert views[other].avg_request_tokens == 20 and views[home].avg_request_tokens == 20
    assert views[home].batch_size == 1 and views[other].batch_size == 0
    assert [r.request_id for r in requests] == ["r"]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4),
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=10),
    st.integers(0, 2**16),
)
def test_two_phase_copies_never_leak_or_double_own_blocks(num_instances, shapes, seed):
    """Random requests, random migration orders every step, random aborts: after every step the
    KV manager's invariants hold (no block leaked or owned twice, reservations accounted), and
    once everything finished no block is in use."""
    rng = random.Random(seed)
    kv = ClusterKVManager(num_instances, 12, 4, lend_fraction=0.8, placement="infinite")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=6), kv)
    coord = MigrationCoordinator(kv, default_perf_model(None), interval_steps=10**9, tokens_per_step=8)
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    for i, (prompt_len, max_tokens) in enumerate(shapes):
        try:
            sched.add_request(Request(f"r{i}", list(range(1, prompt_len + 1)), params(max_tokens), 0.0, 10**9))
        except RequestTooLongError:
            pass
    issued = 0
    for _ in range(3000):
        if not sched.has_unfinished():
            break
        coord.commit_copies(sched)
        kv.check_invariants()
        out = sched.schedule()
        if sched.running and rng.random() < 0.5:
            r = rng.choice(sched.running)
            dst = rng.choice([i for i in range(num_instances) if i != r.home])
            coord.orders.append(_Order(r.request_id, src=rng.choice([r.home, dst]), dst=dst,
                                       blocks_left=rng.randint(1, 3)))
        out.plan.migrations = coord.issue_copies(sched, step=1)
        issued += len(out.plan.migrations)
        for move in out.plan.migrations:  # a copy never touches a block this step computes in
            assert all(move.src not in w.block_table[w.start_pos // 4:] and move.dst not in w.block_table
                       for w in out.plan.seqs)
        kv.check_invariants()
        sched.update(out, [SampleResult(w.request_id, 5) for w in out.plan.seqs if w.sample], now=0.0)
        if rng.random() < 0.05 and sched.running:
            victim = rng.choice(sched.running).request_id
            sched.abort(victim)
            coord.forget(victim)
        for request in list(sched.requests.values()):
            if request.is_finished:
                coord.forget(request.request_id)
                sched.pop_finished(request.request_id)
    assert not sched.has_unfinished()
    coord.commit_copies(sched)
    assert coord.num_migrated_blocks + coord.num_dropped_copies == issued
    assert kv.num_used_blocks() == 0 and kv.requests() == []
    kv.check_invariants()
