"""MigrationCoordinator: reserve-first, full blocks only, rate-limited (no torch)."""

from __future__ import annotations

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.migration import MigrationCoordinator, _Order, default_perf_model
from infinite_llm.control.plan import SampleResult
from infinite_llm.control.request import Request
from infinite_llm.control.scheduler import Scheduler
from infinite_llm.sampling import SamplingParams


def _setup(blocks=16, tokens_per_step=8, block_size=4):
    kv = ClusterKVManager(2, blocks, block_size, lend_fraction=1.0, placement="infinite")
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv)
    coord = MigrationCoordinator(kv, default_perf_model(None), interval_steps=10**9, tokens_per_step=tokens_per_step)
    sched.add_request(Request("r", list(range(1, 31)), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), 0.0, 10**9))
    out = sched.schedule()
    sched.update(out, [SampleResult("r", 5)], now=0.0)
    return kv, sched, coord


def test_moves_full_blocks_within_rate_limit():
    kv, sched, coord = _setup(tokens_per_step=8)  # 8 tokens / 4 per block = 2 blocks per step
    home = sched.requests["r"].home
    coord.orders = [_Order("r", src=home, dst=1 - home, blocks_left=5)]
    moves = coord.plan_step(sched, step=1)
    assert len(moves) == 2
    full = sched.requests["r"].num_computed_tokens // kv.block_size
    table = kv.block_table("r")
    for m in moves:
        assert m.src.instance == home and m.dst.instance == 1 - home
        index = table.index(m.dst)
        assert index < full  # only full, immutable blocks move
    kv.check_invariants()
    assert len(coord.plan_step(sched, step=2)) == 2
    assert len(coord.plan_step(sched, step=3)) == 1  # order exhausted after 5 blocks
    assert coord.num_migrated_blocks == 5


def test_failed_reservation_drops_order_until_next_round():
    kv, sched, coord = _setup()
    home = sched.requests["r"].home
    other = 1 - home
    # Fill the target completely so the reservation cannot succeed.
    kv.allocate("filler", other, kv.block_size * kv.rmanagers[other].pool.num_free)
    coord.orders = [_Order("r", src=home, dst=other, blocks_left=3)]
    before = kv.block_table("r")
    assert coord.plan_step(sched, step=1) == []
    assert coord.num_failed_reservations == 1 and coord.orders == []
    assert kv.block_table("r") == before
    kv.check_invariants()
