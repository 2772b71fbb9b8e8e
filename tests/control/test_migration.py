"""HomeMigrations: a home carries out MigrationOrders as reserve-first, rate-limited copies of
full blocks, committed at a step boundary once the target confirmed them (cluster_harness runs
the copy protocol: CopyBlock -> BlockData -> CopyDone, each a message)."""

import pytest

from infinite_llm.control import messages as m
from infinite_llm.control.messages import MigrationOrder
from infinite_llm.control.migration import HomeMigrations
from infinite_llm.control.plan import BlockRef

from tests.control.cluster_harness import Cluster, make_request

BS = 4


def admit(c, home, rid, tokens, computed=None):
    """A running request homed on `home` whose KV of `tokens` tokens is allocated and written."""
    node = c[home]
    node.new_epoch(rid)
    assert node.grow(rid, tokens)
    request = make_request(rid, tokens)
    request.num_computed_tokens = tokens if computed is None else computed
    return request


def step(c, home, running):
    """A home's step boundary as the engine runs it: commit, (schedule), issue."""
    mig = c[home].migrations
    committed = mig.commit(running)
    started = mig.issue(running)
    return committed, started


def instances(c, home, rid):
    return [r.instance for r in c.table(home, rid)]


def copy_messages(c, kind):
    return [msg for _, _, msg in c.net.sent if isinstance(msg, kind)]


# --------------------------------------------------------------------------- rate and shape
def test_rate_limit_per_step_latest_full_blocks_first():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=2 * BS)
    r = admit(c, 0, "r", 7 * BS, computed=6 * BS + 2)  # blocks 0-5 full, 6 still written
    running = {"r": r}
    mig = c[0].migrations
    assert mig.blocks_per_step == 2
    mig.add_order(MigrationOrder("r", 0, 1, 10))
    before = c.table(0, "r")
    assert step(c, 0, running) == (0, 2)
    assert sorted(cp.index for cp in mig.in_flight.values()) == [4, 5]
    # Issued, not committed: the table still reads the sources; the targets are reservations.
    assert c.table(0, "r") == before
    assert c[0].kv.reservations("r") == [BlockRef(1, 0), BlockRef(1, 1)]
    assert mig.busy()
    c.check()
    c.drain()
    assert step(c, 0, running) == (2, 2)  # commit two, issue the next two
    assert instances(c, 0, "r") == [0, 0, 0, 0, 1, 1, 0]
    c.drain()
    assert step(c, 0, running) == (2, 2)
    c.drain()
    assert step(c, 0, running) == (2, 0)  # the order is done: only full blocks ever move
    assert instances(c, 0, "r") == [1, 1, 1, 1, 1, 1, 0]
    assert mig.num_migrated_blocks == 6 and not mig.busy()
    c.check()
    c.check_data({"r": r.num_computed_tokens})
    assert c[1].rm.guest_blocks("r") == [(i, b.block) for i, b in enumerate(c.table(0, "r")[:6])]


def test_the_step_budget_is_shared_by_orders():
    c = Cluster(2, num_blocks=16, block_size=BS, migration_tokens_per_step=3 * BS)
    running = {"a": admit(c, 0, "a", 4 * BS), "b": admit(c, 0, "b", 4 * BS)}
    mig = c[0].migrations
    mig.add_order(MigrationOrder("a", 0, 1, 2))
    mig.add_order(MigrationOrder("b", 0, 1, 2))
    assert step(c, 0, running) == (0, 3)
    assert sorted((cp.request_id, cp.index) for cp in mig.in_flight.values()) == [("a", 2), ("a", 3), ("b", 3)]
    assert mig.orders == type(mig.orders)([MigrationOrder("b", 0, 1, 1)])
    c.drain()
    assert step(c, 0, running) == (3, 1)
    c.drain()
    assert step(c, 0, running) == (1, 0)
    c.check()


def test_only_full_blocks_move():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=8 * BS)
    r = admit(c, 0, "r", 5 * BS, computed=2 * BS + 3)  # 2 full blocks; 2 and later are written
    running = {"r": r}
    c[0].migrations.add_order(MigrationOrder("r", 0, 1, 5))
    assert step(c, 0, running) == (0, 2)
    c.drain()
    assert step(c, 0, running) == (2, 0)
    assert instances(c, 0, "r") == [1, 1, 0, 0, 0]
    # Once more tokens are computed, a new order can move the newly full blocks.
    r.num_computed_tokens = 4 * BS
    c[0].migrations.add_order(MigrationOrder("r", 0, 1, 5))
    assert step(c, 0, running) == (0, 2)
    assert sorted(cp.index for cp in c[0].migrations.in_flight.values()) == [2, 3]
    c.drain()
    step(c, 0, running)
    c.check()
    c.check_data({"r": r.num_computed_tokens})


def test_an_order_for_a_request_that_is_not_running_is_dropped():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=2 * BS)
    admit(c, 0, "r", 4 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 2))
    assert step(c, 0, {}) == (0, 0)  # e.g. preempted this step
    assert not mig.busy() and copy_messages(c, m.BorrowRequest) == []


# --------------------------------------------------------------------------- reserve first
def test_refused_reservation_drops_the_order():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=2 * BS)
    admit(c, 1, "fill", 8 * BS)  # the target is full
    r = admit(c, 0, "r", 4 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 3))
    before = c.table(0, "r")
    assert step(c, 0, {"r": r}) == (0, 0)
    assert mig.num_failed_reservations == 1 and not mig.orders and not mig.in_flight
    assert copy_messages(c, m.CopyBlock) == []  # nothing is copied before the space is held
    assert c.table(0, "r") == before and c[0].kv.reservations("r") == []
    c.check()


# --------------------------------------------------------------------------- commit
def test_commit_only_after_copy_done():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=1 * BS)
    r = admit(c, 0, "r", 4 * BS)
    running = {"r": r}
    c[0].migrations.add_order(MigrationOrder("r", 0, 1, 1))
    before = c.table(0, "r")
    step(c, 0, running)
    c.net.hold = lambda src, dst, msg: isinstance(msg, m.CopyDone)
    c.drain()  # the block is copied, but the home has not heard
    assert c[1].data[0] == ("r", 1, 3)
    assert c[0].migrations.commit(running) == 0
    assert c.table(0, "r") == before
    c.check()
    c.net.hold = None
    c.drain()
    assert c[0].migrations.commit(running) == 1
    assert c.table(0, "r")[3] == BlockRef(1, 0) and c[0].kv.reservations("r") == []
    c.drain()  # the attach reaches the new holder
    assert c[1].rm.guest_blocks("r") == [(3, 0)]
    c.check()
    c.check_data({"r": r.num_computed_tokens})


def test_a_failed_copy_cancels_its_reservation():
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=1 * BS)
    r = admit(c, 0, "r", 4 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 1))
    step(c, 0, {"r": r})
    (tag,) = mig.in_flight
    mig.copy_done(tag, False)  # the source or target could not copy
    assert mig.commit({"r": r}) == 0
    assert mig.num_dropped_copies == 1 and c[0].kv.reservations("r") == []
    c.drain()  # the real CopyDone for the same tag arrives later and is ignored
    assert mig.commit({"r": r}) == 0 and mig.num_dropped_copies == 1
    c.check()
    assert c.used_blocks() == [4, 0]


@pytest.mark.parametrize("done_first", [False, True])
def test_copy_of_an_aborted_request_is_dropped_without_leaks(done_first):
    c = Cluster(3, num_blocks=4, block_size=BS, migration_tokens_per_step=2 * BS)
    r = admit(c, 0, "r", 6 * BS)  # 4 at home, 2 borrowed from instance 1
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 1, 2, 2))  # creditor -> third instance
    step(c, 0, {"r": r})
    assert len(mig.in_flight) == 2
    if done_first:
        c.drain()  # confirmed, but not committed before the abort
    c[0].kv.free("r")
    mig.forget("r")
    c.drain()
    assert step(c, 0, {}) == (0, 0)
    assert mig.num_dropped_copies == 2 and mig.num_migrated_blocks == 0 and not mig.busy()
    c.check()
    assert c.used_blocks() == [0, 0, 0]


def test_copy_of_a_preempted_request_is_dropped_and_never_commits_after_readmission():
    """A request is preempted while a copy is in flight, re-admitted, and a new order reserves the
    same target block again (pools hand out the lowest free id). The old copy's confirmation,
    arriving late, must not commit its position into the new reservation."""
    c = Cluster(2, num_blocks=8, block_size=BS, migration_tokens_per_step=1 * BS)
    r = admit(c, 0, "r", 3 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 1))
    step(c, 0, {"r": r})
    assert [(cp.index, cp.dst) for cp in mig.in_flight.values()] == [(2, BlockRef(1, 0))]
    c.net.hold = lambda src, dst, msg: isinstance(msg, (m.CopyBlock, m.BlockData, m.CopyDone))
    c[0].kv.free("r")  # preempted: KV and reservation go, the request waits
    c.drain()  # the release reaches instance 1; the copy is still on its way
    step(c, 0, {})  # the step that preempted it
    # Re-admitted with 2 full blocks computed; a new order moves its latest full block, index 1.
    r = admit(c, 0, "r", 3 * BS, computed=2 * BS + 1)
    assert c.table(0, "r") == [BlockRef(0, 0), BlockRef(0, 1), BlockRef(0, 2)]
    mig.add_order(MigrationOrder("r", 0, 1, 1))
    step(c, 0, {"r": r})
    assert [(cp.index, cp.dst) for cp in mig.in_flight.values()] == [(1, BlockRef(1, 0))]
    c.net.hold = None
    c.drain()
    assert mig.commit({"r": r}) == 1
    assert c.table(0, "r") == [BlockRef(0, 0), BlockRef(1, 0), BlockRef(0, 2)]
    c.drain()
    c.check()
    c.check_data({"r": r.num_computed_tokens})
    assert mig.num_dropped_copies == 1 and not mig.in_flight


def test_in_flight_positions_are_not_copied_twice():
    c = Cluster(3, num_blocks=8, block_size=BS, migration_tokens_per_step=2 * BS)
    r = admit(c, 0, "r", 4 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 2))
    step(c, 0, {"r": r})  # positions 2 and 3 in flight
    mig.add_order(MigrationOrder("r", 0, 2, 4))
    assert mig.issue({"r": r}) == 2
    assert sorted((cp.index, cp.dst.instance) for cp in mig.in_flight.values()) == [(0, 2), (1, 2), (2, 1), (3, 1)]
    c.drain()
    assert mig.commit({"r": r}) == 4
    assert instances(c, 0, "r") == [2, 2, 1, 1]
    c.drain()
    c.check()
    c.check_data({"r": r.num_computed_tokens})


# --------------------------------------------------------------------------- orders
def test_a_newer_order_replaces_an_older_one():
    c = Cluster(3, num_blocks=8, block_size=BS, migration_tokens_per_step=1 * BS)
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 0, 1, 5))
    mig.add_order(MigrationOrder("s", 0, 1, 1))
    mig.add_order(MigrationOrder("r", 0, 2, 2))
    assert list(mig.orders) == [MigrationOrder("s", 0, 1, 1), MigrationOrder("r", 0, 2, 2)]
    mig.forget("s")
    assert list(mig.orders) == [MigrationOrder("r", 0, 2, 2)]
    # The replacement is what runs.
    r = admit(c, 0, "r", 4 * BS)
    mig.forget("nobody")
    step(c, 0, {"r": r})
    c.drain()
    step(c, 0, {"r": r})
    c.drain()
    step(c, 0, {"r": r})
    assert instances(c, 0, "r") == [0, 0, 2, 2]
    with pytest.raises(ValueError, match=">= 0"):
        HomeMigrations(c[0].kv, -1, None)


@pytest.mark.parametrize("src, dst, expected", [
    (1, 0, [0, 0, 0, 0, 1, 0]),  # creditor -> home (the latest full block first)
    (1, 2, [0, 0, 0, 0, 1, 2]),  # creditor -> third instance
    (0, 2, [0, 0, 0, 2, 1, 1]),  # home -> another creditor
])
def test_moves_between_any_two_holders(src, dst, expected):
    c = Cluster(3, num_blocks=[6, 4, 4], block_size=BS, migration_tokens_per_step=1 * BS)
    assert c[0].kv.allocate("pad", 2 * BS)
    r = admit(c, 0, "r", 6 * BS)  # fits one instance: positions 0-3 at home, 4-5 on instance 1
    c[0].kv.free("pad")
    assert instances(c, 0, "r") == [0, 0, 0, 0, 1, 1]
    c[0].migrations.add_order(MigrationOrder("r", src, dst, 1))
    step(c, 0, {"r": r})
    c.drain()
    assert step(c, 0, {"r": r}) == (1, 0)
    assert instances(c, 0, "r") == expected
    c.drain()
    c.check()  # guest indexes of the old and the new holder follow the table
    c.check_data({"r": r.num_computed_tokens})
    c[0].kv.free("r")
    c.check()
    assert c.used_blocks() == [0, 0, 0]


# --------------------------------------------------------------------------- the copy guard
def test_a_late_copy_never_overwrites_a_reused_block():
    """A copy from creditor 2 to instance 1 is in flight (its BlockData late) when the request is
    preempted; re-admitted, it borrows from instance 1 and gets the same block id for a live
    position, whose KV it writes. Then the stale BlockData arrives: the target refuses it, since
    the block is no longer reserved for that copy."""
    c = Cluster(3, num_blocks=[6, 6, 8], block_size=BS, migration_tokens_per_step=1 * BS)
    assert c[0].kv.allocate("pad", 2 * BS)  # the home has room for 4 of the request's 6 blocks
    r = admit(c, 0, "r", 6 * BS)
    assert instances(c, 0, "r") == [0, 0, 0, 0, 2, 2]
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 2, 1, 1))
    step(c, 0, {"r": r})
    c.net.hold = lambda src, dst, msg: isinstance(msg, m.BlockData)
    c.drain()  # instance 2 read the source and sent its BlockData, which is late
    c[0].kv.free("r")
    c.drain()
    step(c, 0, {})
    c[2].refuse_to.add(0)
    r = admit(c, 0, "r", 6 * BS)
    assert c.table(0, "r")[4] == BlockRef(1, 0)  # the late copy's target, now a live block
    c.net.hold = None
    c.drain()
    assert copy_messages(c, m.CopyDone)[-1].ok is False
    c.check()
    c.check_data({"r": r.num_computed_tokens})


def test_a_late_copy_never_fills_a_new_reservation_of_the_same_block():
    """Same, but the block is reserved again by a newer copy of another position, from another
    source: only the newer copy may fill it, whichever BlockData arrives last."""
    c = Cluster(3, num_blocks=[6, 6, 8], block_size=BS, migration_tokens_per_step=1 * BS)
    assert c[0].kv.allocate("pad", 2 * BS)
    r = admit(c, 0, "r", 6 * BS)  # positions 0-3 at home, 4-5 on instance 2
    c[0].kv.free("pad")
    assert instances(c, 0, "r") == [0, 0, 0, 0, 2, 2]
    mig = c[0].migrations
    mig.add_order(MigrationOrder("r", 2, 1, 1))  # position 5: instance 2 -> instance 1
    step(c, 0, {"r": r})
    c.net.hold = lambda src, dst, msg: src == 2 and isinstance(msg, m.BlockData)
    c.drain()
    c[0].kv.free("r")
    c.drain()
    step(c, 0, {})
    r = admit(c, 0, "r", 5 * BS, computed=3 * BS + 1)  # all at home this time
    mig.add_order(MigrationOrder("r", 0, 1, 1))  # position 2: home -> instance 1
    step(c, 0, {"r": r})
    assert [(cp.index, cp.dst) for cp in mig.in_flight.values()] == [(2, BlockRef(1, 0))]
    c.drain()  # the new copy lands first
    c.net.hold = None
    c.drain()  # then the stale one, which is refused
    assert step(c, 0, {"r": r}) == (1, 0)
    c.drain()
    c.check()
    c.check_data({"r": r.num_computed_tokens})
