"""HomeKV: one home's block tables over a cluster that talks by messages (cluster_harness).

Local first, borrowing only once the home is full; all-or-nothing allocation; the three
placement policies; free; placement reports; reservations and committed moves between any two
holders, with the holders' guest indexes following."""

import pytest

from infinite_llm.control import messages as m
from infinite_llm.control.home_kv import HomeKV, lend_cap_for
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager

from tests.control.cluster_harness import Cluster

BS = 4


def refs(*pairs):
    return [BlockRef(i, b) for i, b in pairs]


def borrow_messages(cluster):
    return [msg for _, _, msg in cluster.net.sent if isinstance(msg, m.BorrowRequest)]


# --------------------------------------------------------------------------- local first
def test_a_home_with_room_never_borrows():
    c = Cluster(2, num_blocks=8, block_size=BS)
    assert c[0].kv.allocate("a", 5 * BS)
    assert c.table(0, "a") == refs(*[(0, b) for b in range(5)])
    assert borrow_messages(c) == [] and c[0].rm.num_borrowed == 0
    assert not c[0].kv.is_split("a") and c[0].kv.holders("a") == {0: 5}
    c.check()


def test_borrow_only_for_what_the_full_home_lacks():
    c = Cluster(3, num_blocks=8, block_size=BS)
    assert c[0].kv.allocate("a", 6 * BS)
    assert c[0].kv.allocate("b", 5 * BS)  # 2 blocks left at home: 3 borrowed
    table = c.table(0, "b")
    assert table[:2] == refs((0, 6), (0, 7))
    assert [r.instance for r in table[2:]] == [1, 1, 1]  # the best candidate covers all three
    (req,) = borrow_messages(c)
    assert (req.borrower, req.request_id, req.num_blocks, req.indices) == (0, "b", 3, [2, 3, 4])
    assert c[1].rm.guest_blocks("b") == [(2, 0), (3, 1), (4, 2)]
    assert c[0].kv.is_split("b") and c[0].kv.holders("b") == {0: 2, 1: 3}
    c.check()


def test_new_tokens_go_home_while_it_has_room():
    c = Cluster(2, num_blocks=4, block_size=BS)
    assert c[0].kv.allocate("short", 2 * BS)
    assert c[0].kv.allocate("long", 4 * BS)  # 2 at home, 2 borrowed
    assert [r.instance for r in c.table(0, "long")] == [0, 0, 1, 1]
    c[0].kv.free("short")  # the home has room again
    assert c[0].kv.allocate("long", 6 * BS)
    assert [r.instance for r in c.table(0, "long")] == [0, 0, 1, 1, 0, 0]
    assert len(borrow_messages(c)) == 1
    # Growth within the last block allocates nothing.
    assert c[0].kv.allocate("long", 6 * BS - 1) and len(c.table(0, "long")) == 6
    c.check()


def test_creditor_order_follows_the_gmanager_and_survives_a_stale_view():
    c = Cluster(3, num_blocks=[5, 4, 8], block_size=BS)
    # Instance 2 reported 8 lendable blocks, then filled up; the gManager does not know yet.
    assert c[2].kv.allocate("x", 8 * BS)
    assert c[2].rm.lendable == 0 and c.gm.status(2).lendable == 8
    assert c[0].kv.allocate("pad", 3 * BS)
    assert c[0].kv.allocate("a", 5 * BS)  # 2 at home, 3 to borrow: asks 2 first (refused), then 1
    assert [(r.borrower, r.num_blocks) for r in borrow_messages(c)][-2:] == [(0, 3), (0, 3)]
    assert [msg for _, dst, msg in c.net.sent if isinstance(msg, m.BorrowReply)][-2].blocks is None
    assert [r.instance for r in c.table(0, "a")] == [0, 0, 1, 1, 1]
    c.check()


def test_mutual_borrowing():
    """A borrows from B while B borrows from A; both free in any message order."""
    for seed in range(20):
        c = Cluster(2, num_blocks=8, block_size=BS, seed=seed)
        assert c[0].kv.allocate("x", 2 * BS)
        assert c[0].kv.allocate("a", 8 * BS)  # 6 at home, 2 from B
        c[0].kv.free("x")  # A has room again, B does not know yet
        assert c[1].kv.allocate("b", 8 * BS)  # 6 at home, 2 from A
        assert c[0].kv.holders("a") == {0: 6, 1: 2} and c[1].kv.holders("b") == {1: 6, 0: 2}
        assert set(c[0].rm.lent_ledger) == {1} and set(c[1].rm.lent_ledger) == {0}
        c.check()
        c.deliver(seed % 3)
        c[seed % 2].kv.free("ab"[seed % 2])
        assert c[1 - seed % 2].kv.allocate("ba"[seed % 2], 9 * BS)  # grows while the release is in flight
        c.check()
        c[1 - seed % 2].kv.free("ba"[seed % 2])
        c.check()
        assert c.used_blocks() == [0, 0]


# --------------------------------------------------------------------------- all or nothing
def test_refused_partial_borrow_gives_everything_back():
    c = Cluster(3, num_blocks=4, block_size=BS)
    c[2].refuse_to.add(0)  # instance 2 looks rich to the gManager but refuses instance 0
    assert c[2].rm.lendable == 4
    # 4 at home + 4 from instance 1 + 2 more: instance 2 refuses, nobody else can.
    assert c[0].kv.allocate("x", 10 * BS) is False
    assert c.table(0, "x") == [] and c[0].kv.requests() == []
    assert c[0].rm.borrowed_ledger == {} and c[0].rm.num_free == 4
    c.drain()  # the release to instance 1 was sent without waiting
    assert c.used_blocks() == [0, 0, 0]
    assert c[1].rm.lent_ledger == {} and c[1].rm.guest_blocks("x") == []
    c.check()
    # A retry that fits succeeds and reuses the blocks.
    assert c[0].kv.allocate("x", 8 * BS)
    c.check()


def test_refused_growth_keeps_what_the_request_had():
    c = Cluster(2, num_blocks=[6, 4], block_size=BS, lend_fraction=0.5)  # instance 1 lends at most 2
    assert c[0].kv.allocate("pad", 2 * BS)
    assert c[0].kv.allocate("a", 5 * BS)
    before = c.table(0, "a")
    assert c[0].kv.allocate("a", 7 * BS) is False
    assert c.table(0, "a") == before
    c.check()
    assert c.used_blocks() == [6, 1]


def test_static_never_borrows():
    c = Cluster(3, num_blocks=4, block_size=BS, placement="static")
    assert c[0].rm.lend_cap == 0
    assert c[0].kv.allocate("a", 3 * BS)
    assert c[0].kv.allocate("b", 2 * BS) is False  # 1 free block at home: nothing taken
    assert c[0].kv.allocate("a", 5 * BS) is False
    assert c.table(0, "a") == refs((0, 0), (0, 1), (0, 2)) and c.table(0, "b") == []
    assert borrow_messages(c) == [] and c.used_blocks() == [3, 0, 0]
    c.check()
    # A lone static instance needs no PeerLink.
    kv = HomeKV(RManager(0, 2, 0), BS, "static", 1, None)
    assert kv.allocate("a", 2 * BS) and not kv.allocate("b", 1)


# --------------------------------------------------------------------------- striped
def test_striped_places_block_j_on_home_plus_j():
    c = Cluster(3, num_blocks=8, block_size=BS, placement="striped")
    assert c[1].kv.allocate("a", 7 * BS)
    assert [r.instance for r in c.table(1, "a")] == [1, 2, 0, 1, 2, 0, 1]
    assert c[1].kv.allocate("a", 9 * BS)  # growth continues the stripe at position 7
    assert [r.instance for r in c.table(1, "a")][7:] == [2, 0]
    assert c[2].rm.guest_blocks("a") == [(1, 0), (4, 1), (7, 2)]
    assert c[0].rm.guest_blocks("a") == [(2, 0), (5, 1), (8, 2)]
    c.check()


def test_striped_skips_a_refusing_instance():
    c = Cluster(3, num_blocks=8, block_size=BS, placement="striped")
    c[2].refuse_to.add(0)
    assert c[0].kv.allocate("a", 6 * BS)
    table = c.table(0, "a")
    assert [r.instance for r in table] == [0, 1, 0, 0, 1, 1]  # 2's positions (2, 5) spread over 0, 1
    assert c[2].rm.num_lent == 0
    assert c[1].rm.guest_blocks("a") == [(1, 0), (4, 1), (5, 2)]
    c.check()
    # Everyone refusing (the home is full too): nothing is kept.
    c[1].refuse_to.add(0)
    assert c[0].kv.allocate("a", 30 * BS) is False
    assert c.table(0, "a") == table
    c.check()


# --------------------------------------------------------------------------- free
def test_free_releases_everywhere():
    c = Cluster(3, num_blocks=4, block_size=BS)
    assert c[0].kv.allocate("a", 11 * BS)  # home 4, then 4 and 3 from the creditors
    assert sorted(c[0].kv.holders("a").items()) == [(0, 4), (1, 4), (2, 3)]
    assert c[1].kv.allocate("b", 1)  # instance 1 lent everything to a: b borrows too
    assert c.table(1, "b") == refs((2, 3))
    c.check()
    c[0].kv.free("a")
    assert c[0].kv.requests() == [] and c[0].rm.borrowed_ledger == {} and c[0].rm.num_free == 4
    releases = [(dst, msg) for _, dst, msg in c.net.sent if isinstance(msg, m.ReleaseBlocks)]
    assert releases == [(1, m.ReleaseBlocks(0, "a", None)), (2, m.ReleaseBlocks(0, "a", None))]
    c.drain()
    assert c.used_blocks() == [0, 0, 1]
    c.check()
    c[0].kv.free("a")  # idempotent
    c[0].kv.free("never")
    c.check()


def test_free_of_a_request_with_reservations_releases_them_too():
    c = Cluster(3, num_blocks=8, block_size=BS)
    assert c[0].kv.allocate("a", 3 * BS)
    assert c[0].kv.reserve("a", 1, [0, 1]) == refs((1, 0), (1, 1))
    assert c[0].kv.reserve("a", 0, [2]) == refs((0, 3))
    c.check()
    c[0].kv.free("a")
    c.check()
    assert c.used_blocks() == [0, 0, 0]


# --------------------------------------------------------------------------- limits and reports
@pytest.mark.parametrize("placement, n, expected_blocks", [
    ("static", 3, 10), ("striped", 3, 30), ("infinite", 3, 10 + 2 * 5), ("infinite", 1, 10),
    ("striped", 1, 10),
])
def test_max_tokens_per_request(placement, n, expected_blocks):
    cap = lend_cap_for(placement, 10, 0.5)
    kv = HomeKV(RManager(0, 10, cap), BS, placement, n, object())
    assert kv.max_tokens_per_request(10, cap) == expected_blocks * BS
    assert lend_cap_for("static", 10, 0.5) == 0 and lend_cap_for("striped", 10, 0.5) == 10
    assert lend_cap_for("infinite", 10, 0.55) == 5


def test_an_infinite_request_of_the_maximum_size_fits_an_empty_cluster():
    c = Cluster(3, num_blocks=10, block_size=BS, lend_fraction=0.5)
    most = c[0].kv.max_tokens_per_request(10, c[0].rm.lend_cap)
    assert c[0].kv.allocate("a", most)
    assert not c[0].kv.allocate("a", most + 1)
    c.check()


def test_placement_of_reports_only_full_blocks_as_movable():
    c = Cluster(2, num_blocks=[6, 4], block_size=BS)
    assert c[0].kv.allocate("pad", 2 * BS)
    assert c[0].kv.allocate("a", 6 * BS)  # fits one instance: 4 home + 2 on instance 1
    p = c[0].kv.placement_of("a", num_computed_tokens=5 * BS + 1)  # blocks 0-4 full, 5 partial
    assert p == m.RequestPlacement("a", 0, {0: 4 * BS, 1: 2 * BS}, {0: 4, 1: 1})
    p = c[0].kv.placement_of("a", num_computed_tokens=3 * BS)  # blocks 3.. still to be written
    assert p.movable_blocks == {0: 3}
    p = c[0].kv.placement_of("a", num_computed_tokens=6 * BS)
    assert p.movable_blocks == {0: 4, 1: 2}
    assert c[0].kv.placement_of("none", 0) == m.RequestPlacement("none", 0, {}, {})


def test_num_blocks_needed_and_construction_errors():
    c = Cluster(2, num_blocks=4, block_size=BS)
    assert c[0].kv.num_blocks_needed("a", 9) == 3
    c[0].kv.allocate("a", 5)
    assert c[0].kv.num_blocks_needed("a", 9) == 1 and c[0].kv.num_blocks_needed("a", 8) == 0
    with pytest.raises(ValueError, match="unknown placement"):
        HomeKV(RManager(0, 4, 0), BS, "lockstep", 1, None)
    with pytest.raises(ValueError, match="PeerLink"):
        HomeKV(RManager(0, 4, 0), BS, "infinite", 2, None)


# --------------------------------------------------------------------------- moves
def _split_request(c):
    """A request homed on 0 with positions 0-3 at home and 4-5 on instance 1: it fits one
    instance (6 blocks), the home had room for 4 (a 2-block pad, freed again)."""
    assert c[0].kv.allocate("pad", 2 * BS)
    assert c[0].kv.allocate("a", 6 * BS)
    c[0].kv.free("pad")
    assert [r.instance for r in c.table(0, "a")] == [0, 0, 0, 0, 1, 1]
    c.check()


def test_commit_move_from_home_to_creditor():
    c = Cluster(3, num_blocks=[6, 4, 4], block_size=BS)
    _split_request(c)
    old = c.table(0, "a")[1]
    (dst,) = c[0].kv.reserve("a", 1, [0])
    assert dst == BlockRef(1, 2) and c[0].kv.reservations("a") == [dst]
    c.check()  # a reservation is held for the request but has no table position yet
    assert c[0].kv.commit_move("a", 1, dst) == old
    assert c.table(0, "a")[1] == dst and c[0].kv.reservations("a") == []
    assert not c[0].rm.holds("a", old.block)  # the home's source block is free at once
    assert c[0].kv.holders("a") == {0: 3, 1: 3}
    c.drain()  # the attach reaches the holder
    assert c[1].rm.guest_blocks("a") == [(1, 2), (4, 0), (5, 1)]
    c.check()


def test_commit_move_from_creditor_to_home():
    c = Cluster(3, num_blocks=[6, 4, 4], block_size=BS)
    _split_request(c)  # its pad is freed: room at home again
    old = c.table(0, "a")[4]
    (dst,) = c[0].kv.reserve("a", 0, [0])
    assert dst.instance == 0
    assert c[0].kv.commit_move("a", 4, dst) == old
    assert c[0].kv.holders("a") == {0: 5, 1: 1}
    assert c[0].rm.borrowed_ledger == {"a": {1: [c.table(0, "a")[5].block]}}
    c.drain()  # the release reaches the old holder
    assert c[1].rm.guest_blocks("a") == [(5, c.table(0, "a")[5].block)]
    assert not c[1].rm.holds("a", old.block)
    c.check()


def test_commit_move_from_creditor_to_a_third_instance():
    c = Cluster(3, num_blocks=[6, 4, 4], block_size=BS)
    _split_request(c)
    old = c.table(0, "a")[5]
    (dst,) = c[0].kv.reserve("a", 2, [0])
    assert dst.instance == 2 and c[2].rm.guest_blocks("a") == []
    c.check()
    assert c[0].kv.commit_move("a", 5, dst) == old
    assert c[0].kv.holders("a") == {0: 4, 1: 1, 2: 1}
    assert c[0].rm.borrowed_ledger == {"a": {1: [c.table(0, "a")[4].block], 2: [dst.block]}}
    c.drain()
    assert c[1].rm.guest_blocks("a") == [(4, c.table(0, "a")[4].block)]  # lost position 5
    assert c[2].rm.guest_blocks("a") == [(5, dst.block)]  # gained it
    c.check()
    c[0].kv.free("a")
    c.check()
    assert c.used_blocks() == [0, 0, 0]


def test_cancel_reservation_and_move_errors():
    c = Cluster(2, num_blocks=8, block_size=BS)
    assert c[0].kv.allocate("a", 2 * BS)
    with pytest.raises(ValueError, match="unknown request"):
        c[0].kv.reserve("b", 1, [0])
    got = c[0].kv.reserve("a", 1, [0, 1])
    with pytest.raises(ValueError, match="not a reservation"):
        c[0].kv.commit_move("a", 0, BlockRef(1, 7))
    c[0].kv.cancel_reservation("a", got)
    assert c[0].kv.reservations("a") == []
    c.check()
    assert c.used_blocks() == [2, 0]
    assert c[0].kv.reserve("a", 1, list(range(9))) is None  # refused: nothing reserved
    assert c[0].kv.reservations("a") == []
    static = Cluster(2, num_blocks=8, block_size=BS, placement="static")
    static[0].kv.allocate("a", 1)
    with pytest.raises(ValueError, match="static"):
        static[0].kv.reserve("a", 1, [0])


# --------------------------------------------------------------------------- level spread
def test_water_fill_is_as_level_as_the_room_allows():
    from infinite_llm.control.home_kv import water_fill

    assert water_fill(6, [4, 4, 4]) == [2, 2, 2]
    assert water_fill(7, [4, 4, 4]) == [3, 2, 2]  # the home keeps the level longest
    assert water_fill(9, [1, 8, 2]) == [1, 6, 2]
    assert water_fill(0, [3, 3]) == [0, 0]
    assert water_fill(7, [3, 3]) is None


def test_more_than_the_home_and_one_creditor_hold_is_spread_level():
    c = Cluster(4, num_blocks=4, block_size=BS)
    assert c[0].kv.allocate("wide", 10 * BS)  # 4 + 4 < 10: over all four, not home-full first
    assert c[0].kv.holders("wide") == {0: 3, 1: 3, 2: 2, 3: 2}
    assert {rid for rid in c[1].rm.yielding_lent()} == {"wide"}  # larger than an instance: yields
    assert c[0].kv.allocate("wide", 11 * BS)  # growth goes home first, as for any request
    assert c[0].kv.holders("wide")[0] == 4
    c.check()


def test_a_request_larger_than_an_instance_is_admitted_only_past_every_holders_headroom():
    c = Cluster(3, num_blocks=8, block_size=BS, headroom_fraction=0.25)  # 2 blocks of headroom each
    assert c[0].kv.allocate("wide", 9 * BS)
    assert c[0].kv.holders("wide") == {0: 3, 1: 3, 2: 3}
    c.beat()
    # 15 blocks are free, but 10 more would leave some holder under its 2 blocks: it waits.
    assert not c[0].kv.allocate("second", 10 * BS)
    assert [rm.num_free for rm in c.rms] == [5, 5, 5] and c[0].kv.block_table("second") == []
    # Growth of an admitted request may use the headroom (it is not admission).
    assert c[0].kv.allocate("wide", 13 * BS)
    c[0].kv.free("wide")
    c.drain()
    c.beat()
    assert c[0].kv.allocate("second", 10 * BS)
    c.check()


def test_a_request_too_large_to_leave_any_headroom_still_runs_on_an_empty_cluster():
    c = Cluster(3, num_blocks=8, block_size=BS, headroom_fraction=0.25)
    assert c[0].kv.allocate("huge", 20 * BS)  # more than the 18 blocks past everyone's headroom
    assert sum(c[0].kv.holders("huge").values()) == 20
    c.check()
    # Peers lend at most their cap (6 of 8): past the headroom an empty cluster has 6 + 4 = 10.
    capped = Cluster(2, num_blocks=8, block_size=BS, lend_fraction=0.75, headroom_fraction=0.25)
    assert capped[0].kv.allocate("big", 11 * BS)
    assert capped[0].kv.holders("big") == {0: 6, 1: 5}
    capped.check()
