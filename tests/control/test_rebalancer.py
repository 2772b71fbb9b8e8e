"""Tests for the greedy KV rebalancer and the migration rate limiter."""

import copy
import itertools
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.control import rebalancer
from infinite_llm.control.perf_model import HARDWARE_PRESETS, MODEL_PRESETS, PerfModel
from infinite_llm.control.rebalancer import (
    InstanceView,
    Migration,
    MigrationRateLimiter,
    RebalancerConfig,
    RequestKV,
    plan_migrations,
)

BS = 16
# LLaMA2-7B on an A100: ~6.6 ms to read the weights, ~0.26 us per KV token read.
PERF = PerfModel.from_hardware(HARDWARE_PRESETS["A100-80GB"], MODEL_PRESETS["llama2-7b"])
CFG = RebalancerConfig(block_size=BS)
NUM_BLOCKS = 7000


def requests_for(instance: int, count: int, tokens_each: int) -> list[RequestKV]:
    return [RequestKV(f"r{instance}-{j}", instance, {instance: tokens_each}, tokens_each // BS)
            for j in range(count)]


def creditor(instance: int, free: int, batch: int = 10, tokens_each: int = 2048):
    view = InstanceView(instance, NUM_BLOCKS, free, free, batch, 0, tokens_each)
    return view, requests_for(instance, batch, tokens_each)


def debtor_scenario(creditor_specs):
    """Instance 0: one 100K-token request fills its memory, 20 requests wait for memory."""
    long_tokens = 6900 * BS
    views = [InstanceView(0, NUM_BLOCKS, 50, 50, 1, num_waiting_for_memory=20, avg_request_tokens=2000)]
    reqs = [RequestKV("long", 0, {0: long_tokens}, long_tokens // BS - 2)]
    for spec in creditor_specs:
        view, rs = creditor(*spec)
        views.append(view)
        reqs.extend(rs)
    return views, reqs


# ------------------------------------------------------------------------------ decisions
def test_no_moves_when_balanced():
    views, reqs = [], []
    for i in range(4):
        view, rs = creditor(i, free=3000)
        views.append(view)
        reqs.extend(rs)
    assert plan_migrations(views, reqs, PERF, CFG) == []


def test_no_moves_without_a_creditor():
    views, reqs = debtor_scenario([])
    views.append(InstanceView(1, NUM_BLOCKS, 0, 0, 3, num_waiting_for_memory=2, avg_request_tokens=500))
    assert plan_migrations(views, reqs, PERF, CFG) == []


def test_moves_longest_request_from_obvious_debtor_to_emptiest_creditor():
    # Three creditors with the same batch; instance 3 holds the least KV and has the most room.
    views, reqs = debtor_scenario([(1, 300, 10, 8000), (2, 800, 10, 5000), (3, 3000, 10, 2000)])
    reqs.append(RequestKV("short-at-debtor", 0, {0: 0}, 0))
    moves = plan_migrations(views, reqs, PERF, CFG)
    assert moves, "an idle-memory creditor and 20 waiting requests should trigger a migration"
    first = moves[0]
    assert (first.request_id, first.src, first.dst) == ("long", 0, 3)
    # Enough blocks to let all 20 waiting requests (2000 tokens each) in.
    assert first.num_blocks * BS >= 20 * 2000


def test_prefers_an_idle_instance_as_creditor():
    views, reqs = debtor_scenario([(1, 3000, 10, 2000)])
    views.append(InstanceView(2, NUM_BLOCKS, NUM_BLOCKS, 3000, 0, 0, 0))
    moves = plan_migrations(views, reqs, PERF, CFG)
    assert moves[0].dst == 2


def test_stops_when_no_move_gains():
    # The debtor is short of free memory but nobody waits, and the only creditor is already the
    # slower instance: shifting attention there would only slow the pair down.
    views = [InstanceView(0, NUM_BLOCKS, 100, 100, 8, 0, 13_000),
             InstanceView(1, NUM_BLOCKS, 1000, 1000, 32, 0, 3000)]
    reqs = requests_for(0, 8, 13_000) + requests_for(1, 32, 3000)
    assert plan_migrations(views, reqs, PERF, CFG) == []
    # And a gain threshold above what the obvious scenario offers blocks it.
    views, reqs = debtor_scenario([(1, 3000)])
    assert plan_migrations(views, reqs, PERF, CFG)
    assert plan_migrations(views, reqs, PERF, RebalancerConfig(block_size=BS, min_gain=100.0)) == []


def test_debtor_batch_threshold_excludes_large_batches():
    views, reqs = debtor_scenario([(1, 3000)])
    assert plan_migrations(views, reqs, PERF, RebalancerConfig(block_size=BS, debtor_batch_threshold=1)) == []
    assert plan_migrations(views, reqs, PERF, RebalancerConfig(block_size=BS, debtor_batch_threshold=2))


def test_lockstep_splits_attention_evenly_while_independent_model_dumps_it():
    # Debtor: 4 requests reading 104K KV tokens, memory nearly full, nobody waiting. Creditor idle.
    views = [InstanceView(0, NUM_BLOCKS, 300, 300, 4, 0, 26_000),
             InstanceView(1, NUM_BLOCKS, NUM_BLOCKS, 6000, 0, 0, 0)]
    reqs = [RequestKV("big", 0, {0: 80_000}, 5000)] + requests_for(0, 3, 8_000)
    [lockstep] = plan_migrations(views, reqs, PERF, CFG)
    moved = lockstep.num_blocks * BS
    kv_before = 80_000 + 3 * 8_000
    assert lockstep.num_blocks < 5000
    time_d = PERF.decode_step_time(4, kv_before - moved)
    time_c = PERF.attention_time(moved)
    # Balanced to within one block's attention time.
    assert abs(time_d - time_c) <= 2 * PERF.attention_time(BS)
    [independent] = plan_migrations(views, reqs, PERF, RebalancerConfig(block_size=BS, lockstep=False))
    assert independent.num_blocks == 5000  # everything movable: the creditor has no batch to slow


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), lockstep=st.booleans())
def test_plans_respect_lendable_and_movable_blocks(seed, lockstep):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    views, reqs = [], []
    for i in range(n):
        num_blocks = rng.randint(20, 400)
        used = 0
        batch = rng.randint(0, 6)
        for j in range(batch):
            tokens = rng.randint(1, max(1, (num_blocks - used) // max(1, batch - j))) * BS - rng.randint(0, BS - 1)
            blocks = -(-tokens // BS)
            if used + blocks > num_blocks:
                break
            used += blocks
            reqs.append(RequestKV(f"q{i}-{j}", i, {i: tokens}, rng.randint(0, tokens // BS)))
        free = num_blocks - used
        views.append(InstanceView(i, num_blocks, free, rng.randint(0, free), batch,
                                  rng.choice([0, 0, rng.randint(1, 10)]), rng.choice([0, rng.randint(16, 3000)])))
    cfg = RebalancerConfig(block_size=BS, max_moves_per_round=rng.randint(1, 8), lockstep=lockstep)
    before = copy.deepcopy((views, reqs))
    moves = plan_migrations(views, reqs, PERF, cfg)
    assert (views, reqs) == before  # inputs untouched
    assert len(moves) <= cfg.max_moves_per_round
    by_id = {v.instance_id: v for v in views}
    by_request = {r.request_id: r for r in reqs}
    into: dict[int, int] = {}
    out_of: dict[str, int] = {}
    for m in moves:
        assert m.num_blocks > 0 and m.src != m.dst
        assert by_request[m.request_id].home == m.src
        into[m.dst] = into.get(m.dst, 0) + m.num_blocks
        out_of[m.request_id] = out_of.get(m.request_id, 0) + m.num_blocks
    for dst, blocks in into.items():
        assert blocks <= by_id[dst].lendable
    for rid, blocks in out_of.items():
        assert blocks <= by_request[rid].num_full_blocks_at_home
    # An instance never both sends and receives in one round.
    assert not {m.src for m in moves} & set(into)
    # Deterministic, whatever the input order.
    shuffled_views, shuffled_reqs = views[:], reqs[:]
    rng.shuffle(shuffled_views)
    rng.shuffle(shuffled_reqs)
    assert plan_migrations(shuffled_views, shuffled_reqs, PERF, cfg) == moves
    # The per-pair cache is only an optimisation: a plan without it is the same.
    never_equal = itertools.count()
    with mock.patch.object(rebalancer, "_pair_state", lambda *args: next(never_equal)):
        assert plan_migrations(views, reqs, PERF, cfg) == moves


def test_ties_go_to_the_lowest_instance_id():
    views, reqs = debtor_scenario([(2, 3000), (1, 3000)])
    moves = plan_migrations(views, reqs, PERF, CFG)
    assert moves[0].dst == 1
    assert moves == plan_migrations(views, reqs, PERF, CFG)


def test_plan_for_a_32_instance_cluster():
    # Paper-scale shape: 32 instances, a few debtors with a 100K-token request and waiting work.
    views, reqs = [], []
    for i in range(32):
        if i % 8 == 0:
            long_tokens = 6800 * BS
            views.append(InstanceView(i, NUM_BLOCKS, 100, 100, 1, 12, 2048))
            reqs.append(RequestKV(f"long{i}", i, {i: long_tokens}, long_tokens // BS))
        else:
            view, rs = creditor(i, free=NUM_BLOCKS - 10 * 2048 // BS)
            views.append(view)
            reqs.extend(rs)
    moves = plan_migrations(views, reqs, PERF, CFG)
    assert {m.src for m in moves} == {0, 8, 16, 24}
    assert all(m.request_id == f"long{m.src}" for m in moves)


# ------------------------------------------------------------------------------ validation
def test_rejects_inconsistent_inputs():
    views, reqs = debtor_scenario([(1, 3000)])
    with pytest.raises(ValueError, match="duplicate InstanceView"):
        plan_migrations(views + [views[1]], reqs, PERF, CFG)
    with pytest.raises(ValueError, match="no InstanceView"):
        plan_migrations(views, reqs + [RequestKV("x", 9, {9: 16}, 1)], PERF, CFG)
    with pytest.raises(ValueError, match="full blocks at home"):
        plan_migrations(views, reqs + [RequestKV("x", 1, {1: 20}, 2)], PERF, CFG)
    with pytest.raises(ValueError, match="lendable"):
        plan_migrations([InstanceView(0, 10, 2, 5, 1)], [], PERF, CFG)
    with pytest.raises(ValueError, match="block_size"):
        RebalancerConfig(block_size=0)
    with pytest.raises(ValueError, match="min_gain"):
        RebalancerConfig(block_size=16, min_gain=-0.1)


# ------------------------------------------------------------------------------ rate limiter
def test_rate_limiter_caps_blocks_per_step():
    limiter = MigrationRateLimiter(tokens_per_step=64, block_size=16)
    for _ in range(5):
        assert limiter.blocks_allowed_this_step() == 4
        assert limiter.blocks_allowed_this_step() == 4  # asking twice does not add credit
        limiter.record(4)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        limiter.record(5)
    assert limiter.total_blocks_moved == 20 and limiter.num_steps == 5


def test_rate_limiter_does_not_bank_unused_budget():
    limiter = MigrationRateLimiter(tokens_per_step=64, block_size=16)
    for _ in range(10):
        limiter.record(0)
    assert limiter.blocks_allowed_this_step() == 4


def test_rate_limiter_with_budget_smaller_than_a_block():
    limiter = MigrationRateLimiter(tokens_per_step=8, block_size=16)
    allowed = []
    for _ in range(6):
        allowed.append(limiter.blocks_allowed_this_step())
        limiter.record(allowed[-1])
    assert allowed == [0, 1, 0, 1, 0, 1]  # on average 8 tokens per step


def test_rate_limiter_never_exceeds_the_per_step_budget():
    limiter = MigrationRateLimiter(tokens_per_step=40, block_size=16)  # 2.5 blocks per step
    rng = random.Random(0)
    for _ in range(100):
        n = limiter.blocks_allowed_this_step()
        assert n * 16 <= 40
        limiter.record(rng.randint(0, n))
    # A full budget every step moves floor(40 / 16) blocks; the half block is never rounded up.
    for _ in range(10):
        assert limiter.blocks_allowed_this_step() == 2
        limiter.record(2)


def test_rate_limiter_zero_budget_and_validation():
    limiter = MigrationRateLimiter(tokens_per_step=0, block_size=16)
    assert limiter.blocks_allowed_this_step() == 0
    with pytest.raises(ValueError, match="tokens_per_step"):
        MigrationRateLimiter(tokens_per_step=-1, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        MigrationRateLimiter(tokens_per_step=16, block_size=0)


def test_migration_is_a_plain_value():
    assert Migration("r", 0, 1, 3) == Migration("r", 0, 1, 3)
