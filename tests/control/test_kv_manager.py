"""ClusterKVManager: placement policies, atomic allocation, migration bookkeeping, and
hypothesis state-machine tests that run thousands of random operations against the
invariants."""

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from infinite_llm.control.kv_manager import ClusterKVManager
from infinite_llm.control.plan import BlockRef


def snapshot(kv: ClusterKVManager):
    """Everything an allocation may change, to check that a refusal changed nothing."""
    return (
        {r: kv.block_table(r) for r in kv.requests()},
        {r: kv.reservations(r) for r in kv.requests()},
        [(rm.num_free, rm.lent_ledger, rm.borrowed_ledger, rm.own_blocks()) for rm in kv.rmanagers],
        {r: kv.gmanager.placement(r) for r in kv.requests()},
    )


# ------------------------------------------------------------------ construction
def test_unknown_placement_rejected():
    with pytest.raises(ValueError, match="placement policy"):
        ClusterKVManager(2, 8, 4, placement="round-robin")


@pytest.mark.parametrize("kwargs", [
    dict(num_instances=0), dict(block_size=0), dict(lend_fraction=1.5), dict(num_blocks_per_instance=-1),
])
def test_bad_config_rejected(kwargs):
    args = dict(num_instances=2, num_blocks_per_instance=8, block_size=4) | kwargs
    with pytest.raises(ValueError):
        ClusterKVManager(**args)


def test_lend_cap_is_floor_of_fraction():
    kv = ClusterKVManager(2, 10, 4, lend_fraction=0.75)
    assert kv.lend_cap == 7 and all(rm.lend_cap == 7 for rm in kv.rmanagers)


def test_num_blocks_needed():
    kv = ClusterKVManager(1, 8, 4)
    assert kv.num_blocks_needed("a", 0) == 0
    assert kv.num_blocks_needed("a", 1) == 1
    assert kv.num_blocks_needed("a", 9) == 3
    kv.allocate("a", 0, 8)
    assert kv.num_blocks_needed("a", 9) == 1
    assert kv.num_blocks_needed("a", 5) == 0
    with pytest.raises(ValueError):
        kv.num_blocks_needed("a", -1)


# ------------------------------------------------------------------------ static
def test_static_never_borrows():
    kv = ClusterKVManager(3, 4, 2, placement="static")
    assert kv.allocate("a", 1, 8)  # 4 blocks: the whole home pool
    assert all(ref.instance == 1 for ref in kv.block_table("a"))
    assert not kv.can_allocate("a", 1, 9)
    assert not kv.allocate("a", 1, 9)  # others are empty, but static shares nothing
    assert kv.num_free_blocks(0) == 4 and kv.num_free_blocks(2) == 4
    assert all(rm.num_lent == 0 and rm.num_borrowed == 0 for rm in kv.rmanagers)
    with pytest.raises(ValueError, match="static"):
        kv.reserve_on(0, "a", 1)
    kv.check_invariants()


# ----------------------------------------------------------------------- striped
def test_striped_spreads_round_robin_from_home():
    kv = ClusterKVManager(3, 4, 2, placement="striped")
    assert kv.allocate("a", 1, 12)  # 6 blocks
    assert [ref.instance for ref in kv.block_table("a")] == [1, 2, 0, 1, 2, 0]
    assert kv.allocate("a", 1, 14)  # block index 6 continues the stripe
    assert kv.block_table("a")[6].instance == 1
    kv.check_invariants()


def test_striped_falls_back_when_preferred_instance_full():
    kv = ClusterKVManager(3, 2, 1, placement="striped")
    assert kv.allocate("x", 1, 4)
    assert [ref.instance for ref in kv.block_table("x")] == [1, 2, 0, 1]  # instance 1 full now
    assert kv.allocate("a", 0, 2)
    assert [ref.instance for ref in kv.block_table("a")] == [0, 2]  # 1 is full: next one
    assert kv.num_free_blocks() == 0
    assert not kv.allocate("b", 0, 1)
    kv.check_invariants()


def test_striped_uses_the_whole_cluster_ignoring_lend_cap():
    kv = ClusterKVManager(2, 4, 1, lend_fraction=0.25, placement="striped")
    assert kv.allocate("a", 0, 8)
    assert kv.rmanagers[1].num_lent == 4  # more than the cap of 1: striped has no cap
    kv.check_invariants()


# ---------------------------------------------------------------------- infinite
def test_infinite_fills_home_then_borrows_from_best_creditor():
    kv = ClusterKVManager(3, 8, 1, lend_fraction=1.0, placement="infinite")
    assert kv.allocate("other", 2, 3)  # instance 2 has less to lend than instance 1
    assert kv.allocate("a", 0, 12)
    table = kv.block_table("a")
    assert [r.instance for r in table] == [0] * 8 + [1] * 4
    assert kv.gmanager.debt_ledger() == {(0, 1): 4}
    assert kv.rmanagers[0].borrowed_ledger == {"a": {1: [0, 1, 2, 3]}}
    assert kv.rmanagers[1].lent_ledger == {0: {"a": [0, 1, 2, 3]}}
    kv.check_invariants()


def test_infinite_respects_lend_caps_and_spans_creditors():
    kv = ClusterKVManager(3, 10, 1, lend_fraction=0.5, placement="infinite")  # cap 5
    assert kv.allocate("a", 0, 18)
    placement = kv.gmanager.placement("a")
    assert placement == {0: 10, 1: 5, 2: 3}
    assert kv.allocate("a", 0, 20)
    assert kv.gmanager.placement("a") == {0: 10, 1: 5, 2: 5}
    # Everyone is at the cap: 5 free blocks on each creditor, but no more lending.
    assert not kv.can_allocate("a", 0, 21)
    assert not kv.allocate("a", 0, 21)
    assert kv.num_free_blocks(1) == 5
    kv.check_invariants()


def test_refused_allocation_changes_nothing():
    kv = ClusterKVManager(3, 4, 1, lend_fraction=0.5, placement="infinite")
    kv.allocate("a", 0, 3)
    before = snapshot(kv)
    assert not kv.allocate("a", 0, 9)  # 4 home + 2 + 2 lendable = 8 < 9
    assert snapshot(kv) == before
    assert not kv.allocate("b", 1, 100)
    assert snapshot(kv) == before and "b" not in kv.requests()
    kv.check_invariants()


def test_borrow_does_not_cascade_through_the_cluster_manager():
    """A request homed on a full instance borrows directly from creditors; a creditor that
    is itself full is skipped rather than borrowing on the debtor's behalf."""
    kv = ClusterKVManager(3, 4, 1, lend_fraction=1.0, placement="infinite")
    assert kv.allocate("fill1", 1, 4)  # instance 1 full, nothing to lend
    assert kv.allocate("a", 0, 6)
    assert kv.gmanager.placement("a") == {0: 4, 2: 2}
    assert kv.rmanagers[1].num_borrowed == 0 and kv.rmanagers[1].num_lent == 0
    kv.check_invariants()


def test_home_is_fixed_until_free():
    kv = ClusterKVManager(2, 4, 1)
    kv.allocate("a", 0, 2)
    with pytest.raises(ValueError, match="homed on instance 0"):
        kv.allocate("a", 1, 3)
    kv.free("a")
    assert kv.allocate("a", 1, 3)
    assert kv.home_of("a") == 1


def test_allocate_zero_tokens_registers_nothing():
    kv = ClusterKVManager(2, 4, 1)
    assert kv.allocate("a", 0, 0)
    assert kv.requests() == [] and kv.block_table("a") == []


def test_free_releases_everywhere_and_is_idempotent():
    kv = ClusterKVManager(3, 4, 1, lend_fraction=1.0)
    kv.allocate("a", 0, 10)
    kv.reserve_on(2, "a", 1)
    kv.free("a")
    assert kv.block_table("a") == [] and kv.requests() == []
    assert kv.num_free_blocks() == 12
    assert all(rm.lent_ledger == {} and rm.borrowed_ledger == {} for rm in kv.rmanagers)
    assert kv.gmanager.debt_ledger() == {} and kv.gmanager.placement("a") == {}
    kv.free("a")
    kv.free("never-seen")
    kv.check_invariants()


# --------------------------------------------------------------------- migration
def test_replace_block_after_reserve():
    kv = ClusterKVManager(3, 4, 1, lend_fraction=1.0)
    kv.allocate("a", 0, 3)
    (target,) = kv.reserve_on(2, "a", 1)
    assert target.instance == 2 and kv.rmanagers[2].num_lent == 1
    kv.check_invariants()  # a reservation is not a leak
    old = kv.replace_block("a", 1, target)
    assert old == BlockRef(0, 1)
    assert kv.block_table("a") == [BlockRef(0, 0), target, BlockRef(0, 2)]
    assert not kv.rmanagers[0].pool.is_allocated(1)
    assert kv.gmanager.placement("a") == {0: 2, 2: 1}
    assert kv.reservations("a") == []
    kv.check_invariants()


def test_migrate_back_home_clears_the_debt():
    kv = ClusterKVManager(2, 2, 1, lend_fraction=1.0)
    kv.allocate("a", 0, 3)
    remote = kv.block_table("a")[2]
    assert remote.instance == 1
    kv.free("x")  # no-op
    kv.replace_block("a", 0, kv.reserve_on(1, "a", 1)[0])  # home full; move block 0 out
    (home_slot,) = kv.reserve_on(0, "a", 1)
    assert kv.replace_block("a", 2, home_slot) == remote
    assert kv.gmanager.placement("a") == {0: 2, 1: 1}
    kv.check_invariants()


def test_replace_block_rejects_unreserved_refs():
    kv = ClusterKVManager(2, 4, 1)
    kv.allocate("a", 0, 2)
    kv.allocate("b", 1, 1)
    before = snapshot(kv)
    with pytest.raises(ValueError, match="not a reservation"):
        kv.replace_block("a", 0, BlockRef(1, 0))  # b's block
    with pytest.raises(IndexError):
        kv.replace_block("a", 5, BlockRef(1, 0))
    with pytest.raises(ValueError, match="unknown request"):
        kv.replace_block("zzz", 0, BlockRef(1, 0))
    assert snapshot(kv) == before


def test_reservation_refused_past_lend_cap():
    kv = ClusterKVManager(2, 4, 1, lend_fraction=0.5)  # cap 2
    kv.allocate("a", 0, 4)
    assert kv.reserve_on(1, "a", 3) is None
    assert kv.reserve_on(1, "a", 2) is not None
    assert kv.reserve_on(1, "a", 1) is None
    with pytest.raises(ValueError, match="unknown request"):
        kv.reserve_on(1, "nobody", 1)
    kv.check_invariants()


def test_cancel_reservation():
    kv = ClusterKVManager(2, 4, 1)
    kv.allocate("a", 0, 1)
    got = kv.reserve_on(1, "a", 2)
    with pytest.raises(ValueError, match="not a reservation"):
        kv.cancel_reservation("a", [got[0], BlockRef(1, 3)])
    assert kv.reservations("a") == got  # the failed cancel changed nothing
    kv.cancel_reservation("a", got[:1])
    assert kv.reservations("a") == got[1:]
    kv.cancel_reservation("a", got[1:])
    assert kv.num_free_blocks(1) == 4 and kv.rmanagers[0].num_borrowed == 0
    kv.check_invariants()


# ---------------------------------------------------------------- capacity model
@pytest.mark.parametrize("placement, expected_blocks", [
    ("static", 10), ("striped", 40), ("infinite", 10 + 3 * 9),
])
def test_max_tokens_for_request(placement, expected_blocks):
    kv = ClusterKVManager(4, 10, 16, lend_fraction=0.9, placement=placement)
    assert kv.max_tokens_for_request(2) == expected_blocks * 16
    # The bound is reachable on an empty cluster, and one token more is not.
    assert kv.allocate("a", 2, expected_blocks * 16)
    assert not kv.can_allocate("a", 2, expected_blocks * 16 + 1)
    kv.check_invariants()


def test_heartbeat_publishes_home_stats():
    kv = ClusterKVManager(2, 4, 2)
    kv.allocate("a", 1, 3)
    kv.heartbeat(7.0, {0: (5, 500)})
    s0, s1 = kv.gmanager.status(0), kv.gmanager.status(1)
    assert (s0.num_home_requests, s0.num_home_tokens, s0.timestamp) == (5, 500, 7.0)
    assert (s1.num_home_requests, s1.num_home_tokens) == (1, 4)  # default: tables' capacity
    assert kv.gmanager.alive_instances(8.0) == [0, 1]


def test_usage():
    kv = ClusterKVManager(2, 4, 1, lend_fraction=1.0)
    kv.allocate("a", 0, 6)
    assert kv.usage(0) == dict(total=4, used=4, free=0, lent=0, borrowed=2, lendable=0)
    assert kv.usage(1) == dict(total=4, used=2, free=2, lent=2, borrowed=0, lendable=2)
    assert kv.num_used_blocks() == 6 and kv.num_used_blocks(1) == 2


# ------------------------------------------------------------ invariant checking
def test_check_invariants_detects_a_leak():
    kv = ClusterKVManager(2, 4, 1)
    kv.allocate("a", 0, 2)
    kv.rmanagers[1].allocate_local("ghost", 1)  # behind the manager's back
    with pytest.raises(AssertionError, match="leak"):
        kv.check_invariants()


def test_check_invariants_detects_ledger_disagreement():
    kv = ClusterKVManager(2, 2, 1, lend_fraction=1.0)
    kv.allocate("a", 0, 3)
    kv.rmanagers[0].forget_borrowed("a", 1, [kv.block_table("a")[2]])
    with pytest.raises(AssertionError, match="ledgers disagree"):
        kv.check_invariants()


def test_check_invariants_detects_placement_drift():
    kv = ClusterKVManager(2, 4, 1)
    kv.allocate("a", 0, 2)
    kv.gmanager.remove_placement("a", [BlockRef(0, 0)])
    with pytest.raises(AssertionError, match="placement"):
        kv.check_invariants()


def test_control_plane_does_not_import_torch():
    code = (
        "import sys\n"
        "import infinite_llm.control.blocks, infinite_llm.control.rmanager\n"
        "import infinite_llm.control.gmanager, infinite_llm.control.kv_manager\n"
        "assert 'torch' not in sys.modules, 'control plane imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------- property: capacity
@settings(max_examples=200, deadline=None)
@given(
    placement=st.sampled_from(["static", "striped", "infinite"]),
    n=st.integers(1, 4),
    blocks=st.integers(0, 8),
    fraction=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    prefill=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=5),
    home=st.integers(0, 3),
    tokens=st.integers(0, 40),
)
def test_allocation_succeeds_exactly_when_the_policy_has_room(
    placement, n, blocks, fraction, prefill, home, tokens
):
    kv = ClusterKVManager(n, blocks, 1, lend_fraction=fraction, placement=placement)
    for i, (h, t) in enumerate(prefill):
        kv.allocate(f"p{i}", h % n, t)
    home %= n
    rms = kv.rmanagers
    if placement == "static" or n == 1:
        room = rms[home].num_free
    elif placement == "striped":
        room = kv.num_free_blocks()
    else:
        room = rms[home].num_free + sum(rm.lendable for rm in rms if rm.instance_id != home)
    before = snapshot(kv)
    ok = kv.allocate("new", home, tokens)
    assert ok == (tokens <= room)
    if ok:
        assert len(kv.block_table("new")) == tokens
    else:
        assert snapshot(kv) == before
    kv.check_invariants()


# ------------------------------------------------------- stateful: random ops
REQUEST_IDS = [f"r{i}" for i in range(5)]


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / free / reserve / replace / cancel / heartbeat sequences on a small
    cluster; the manager's invariants hold after every step, and freeing everything returns
    the cluster to empty."""

    @initialize(
        placement=st.sampled_from(["static", "striped", "infinite"]),
        n=st.integers(1, 4),
        blocks=st.one_of(st.just(0), st.integers(2, 12)),
        block_size=st.integers(1, 4),
        fraction=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    )
    def setup(self, placement, n, blocks, block_size, fraction):
        self.kv = ClusterKVManager(n, blocks, block_size, lend_fraction=fraction, placement=placement)
        self.tokens: dict[str, int] = {}  # tokens each live request's table must cover
        self.now = 0.0

    @rule(rid=st.sampled_from(REQUEST_IDS), home=st.integers(0, 3), extra=st.integers(0, 10))
    def allocate(self, rid, home, extra):
        kv = self.kv
        known_home = kv.home_of(rid)
        home = known_home if known_home is not None else home % kv.num_instances
        target = self.tokens.get(rid, 0) + extra
        before = snapshot(kv)
        predicted = kv.can_allocate(rid, home, target)
        assert snapshot(kv) == before  # a dry run changes nothing
        ok = kv.allocate(rid, home, target)
        assert ok == predicted
        if ok:
            self.tokens[rid] = max(self.tokens.get(rid, 0), target)
            assert len(kv.block_table(rid)) == math.ceil(self.tokens[rid] / kv.block_size)
            if kv.placement == "static":
                assert all(ref.instance == home for ref in kv.block_table(rid))
        else:
            assert snapshot(kv) == before

    @rule(data=st.data(), extra=st.integers(1, 4))
    def grow_live_request(self, data, extra):
        """Like a decode/prefill step: extend a request that already holds blocks."""
        live = [r for r in self.kv.requests() if self.kv.block_table(r)]
        if live:
            rid = data.draw(st.sampled_from(live))
            self.allocate(rid, 0, extra)

    @rule(data=st.data())
    def migrate_one_block(self, data):
        """The rebalancer's cycle: reserve on a target, then switch one table slot to it."""
        kv = self.kv
        live = [r for r in kv.requests() if kv.block_table(r)]
        if not live:
            return
        rid = data.draw(st.sampled_from(live))
        home = kv.home_of(rid)
        target = home if kv.placement == "static" else data.draw(
            st.integers(0, kv.num_instances - 1)
        )
        got = kv.reserve_on(target, rid, 1)
        if got is None:
            return
        table = kv.block_table(rid)
        index = data.draw(st.integers(0, len(table) - 1))
        old = kv.replace_block(rid, index, got[0])
        assert old == table[index] and kv.block_table(rid)[index] == got[0]

    @rule(rid=st.sampled_from(REQUEST_IDS))
    def free(self, rid):
        self.kv.free(rid)
        self.tokens.pop(rid, None)
        assert self.kv.block_table(rid) == [] and rid not in self.kv.requests()

    @rule(rid=st.sampled_from(REQUEST_IDS), instance=st.integers(0, 3), n=st.integers(0, 3))
    def reserve(self, rid, instance, n):
        kv = self.kv
        home = kv.home_of(rid)
        if home is None:
            return
        instance = home if kv.placement == "static" else instance % kv.num_instances
        before_free = kv.num_free_blocks(instance)
        before = kv.reservations(rid)
        got = kv.reserve_on(instance, rid, n)
        if got is None:
            assert kv.reservations(rid) == before and kv.num_free_blocks(instance) == before_free
        else:
            assert len(got) == n and all(ref.instance == instance for ref in got)
            assert kv.reservations(rid) == before + got

    def _with_reservations(self, data) -> str | None:
        holders = [r for r in self.kv.requests() if self.kv.reservations(r)]
        return data.draw(st.sampled_from(holders)) if holders else None

    @rule(data=st.data())
    def replace(self, data):
        kv = self.kv
        rid = self._with_reservations(data)
        if rid is None or not kv.block_table(rid):
            return
        table, reserved = kv.block_table(rid), kv.reservations(rid)
        index = data.draw(st.integers(0, len(table) - 1))
        new_ref = data.draw(st.sampled_from(reserved))
        old = kv.replace_block(rid, index, new_ref)
        assert old == table[index]
        assert kv.block_table(rid)[index] == new_ref
        assert not kv.rmanagers[old.instance].pool.is_allocated(old.block)
        assert len(kv.block_table(rid)) == len(table)

    @rule(data=st.data())
    def cancel(self, data):
        kv = self.kv
        rid = self._with_reservations(data)
        if rid is None:
            return
        reserved = kv.reservations(rid)
        chosen = data.draw(
            st.lists(st.sampled_from(reserved), unique=True, min_size=1, max_size=len(reserved))
        )
        free_before = kv.num_free_blocks()
        kv.cancel_reservation(rid, chosen)
        assert set(kv.reservations(rid)) == set(reserved) - set(chosen)
        assert kv.num_free_blocks() == free_before + len(chosen)

    @rule(dt=st.floats(0.0, 5.0))
    def heartbeat(self, dt):
        self.now += dt
        self.kv.heartbeat(self.now)

    @invariant()
    def consistent(self):
        self.kv.check_invariants()

    def teardown(self):
        kv = self.kv
        for rid in list(kv.requests()):
            kv.free(rid)
        kv.check_invariants()
        assert kv.requests() == []
        for rm in kv.rmanagers:
            assert rm.num_free == rm.pool.num_blocks, f"instance {rm.instance_id} not full"
            assert rm.lent_ledger == {} and rm.borrowed_ledger == {} and rm.own_blocks() == {}
            assert rm.num_lent == 0 and rm.num_borrowed == 0
        assert kv.gmanager.debt_ledger() == {} and kv.gmanager.requests() == []


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
