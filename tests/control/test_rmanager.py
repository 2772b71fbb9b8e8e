"""RManager: local vs remote allocation, lend cap, refusals, ledgers on both sides."""

import pytest

from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager


def refs(instance, ids):
    return [BlockRef(instance, b) for b in ids]


def test_allocate_local_and_release():
    rm = RManager(0, num_blocks=4, lend_cap=2)
    got = rm.allocate_local("a", 3)
    assert got == refs(0, [0, 1, 2])
    assert rm.blocks_held("a") == got
    assert rm.num_free == 1 and rm.num_lent == 0
    assert rm.allocate_local("b", 2) is None  # not enough free: refused, nothing taken
    assert rm.num_free == 1
    rm.release("a", got[:2])
    assert rm.blocks_held("a") == [BlockRef(0, 2)]
    assert rm.num_free == 3


def test_local_allocation_ignores_lend_cap():
    rm = RManager(0, num_blocks=4, lend_cap=1)
    assert rm.allocate_local("a", 4) is not None
    assert rm.lendable == 0


def test_lend_records_ledger_and_counts():
    rm = RManager(1, num_blocks=8, lend_cap=5)
    got = rm.lend(0, "a", 3)
    assert got == refs(1, [0, 1, 2])
    assert rm.num_lent == 3 and rm.lendable == 2
    assert rm.lent_ledger == {0: {"a": [0, 1, 2]}}


def test_lend_refused_past_lend_cap():
    rm = RManager(1, num_blocks=8, lend_cap=4)
    assert rm.lend(0, "a", 3) is not None
    assert rm.lend(2, "b", 2) is None  # 3 + 2 > cap 4
    assert rm.num_lent == 3 and rm.num_free == 5
    assert rm.lend(2, "b", 1) is not None  # exactly at the cap is allowed
    assert rm.lendable == 0


def test_lend_refused_when_creditor_full():
    rm = RManager(1, num_blocks=4, lend_cap=4)
    rm.allocate_local("own", 3)
    assert rm.lend(0, "a", 2) is None
    assert rm.num_free == 1 and rm.lent_ledger == {}


def test_lending_to_self_is_an_error():
    with pytest.raises(ValueError, match="itself"):
        RManager(0, 4, 2).lend(0, "a", 1)


def test_borrow_records_both_ledgers():
    home, creditor = RManager(0, 4, 3), RManager(1, 4, 3)
    got = home.borrow(creditor, "a", 2)
    assert got == refs(1, [0, 1])
    assert home.borrowed_ledger == {"a": {1: [0, 1]}}
    assert creditor.lent_ledger == {0: {"a": [0, 1]}}
    assert home.num_borrowed == 2 and creditor.num_lent == 2
    assert home.num_free == 4  # borrowing takes nothing from the borrower's own pool


def test_borrow_never_cascades():
    """A creditor that cannot lend refuses; it does not turn to a third instance."""
    home, full_creditor, rich = RManager(0, 4, 4), RManager(1, 4, 4), RManager(2, 8, 8)
    full_creditor.allocate_local("its-own", 4)
    assert home.borrow(full_creditor, "a", 1) is None
    assert home.borrowed_ledger == {}
    assert full_creditor.num_borrowed == 0 and full_creditor.borrowed_ledger == {}
    assert rich.num_free == 8 and rich.lent_ledger == {}


def test_borrow_refused_past_creditor_cap_is_atomic():
    home, creditor = RManager(0, 4, 3), RManager(1, 10, 3)
    assert home.borrow(creditor, "a", 4) is None
    assert creditor.num_free == 10 and home.num_borrowed == 0


def test_reserve_is_counted_as_lent_and_capped():
    rm = RManager(2, num_blocks=6, lend_cap=3)
    assert rm.reserve(0, "a", 2) == refs(2, [0, 1])
    assert rm.num_lent == 2
    assert rm.reserve(0, "a", 2) is None
    # A reservation for a request homed here (migrating back home) is a local allocation.
    assert rm.reserve(2, "b", 3) == refs(2, [2, 3, 4])
    assert rm.num_lent == 2


def test_release_of_lent_block_then_forget_borrowed():
    home, creditor = RManager(0, 4, 3), RManager(1, 4, 3)
    got = home.borrow(creditor, "a", 3)
    creditor.release("a", got[1:2])
    home.forget_borrowed("a", 1, got[1:2])
    assert creditor.lent_ledger == {0: {"a": [0, 2]}}
    assert home.borrowed_ledger == {"a": {1: [0, 2]}}
    assert creditor.num_lent == 2 and home.num_borrowed == 2
    creditor.release("a", [got[0], got[2]])
    home.forget_borrowed("a", 1, [got[0], got[2]])
    assert creditor.lent_ledger == {} and home.borrowed_ledger == {}
    assert creditor.num_free == 4


def test_release_validates_before_freeing():
    rm = RManager(0, 4, 3)
    a = rm.allocate_local("a", 2)
    b = rm.allocate_local("b", 1)
    with pytest.raises(ValueError, match="not held for request 'a'"):
        rm.release("a", [a[0], b[0]])
    with pytest.raises(ValueError, match="not on instance 0"):
        rm.release("a", [BlockRef(1, 0)])
    with pytest.raises(ValueError, match="twice"):
        rm.release("a", [a[0], a[0]])
    with pytest.raises(ValueError):
        rm.release("a", [BlockRef(0, 3)])  # never allocated
    assert rm.blocks_held("a") == a and rm.num_free == 1


def test_forget_borrowed_unknown_raises():
    rm = RManager(0, 4, 3)
    with pytest.raises(ValueError, match="not recorded"):
        rm.forget_borrowed("a", 1, [BlockRef(1, 0)])


def test_free_request_frees_own_and_lent():
    rm = RManager(1, 8, 6)
    own = rm.allocate_local("a", 2)
    lent = rm.lend(0, "b", 2)
    rm.lend(2, "c", 1)
    assert rm.free_request("a") == own
    assert rm.free_request("b") == lent
    assert rm.free_request("b") == []  # idempotent
    assert rm.num_free == 7 and rm.num_lent == 1
    assert rm.lent_ledger == {2: {"c": [4]}}


def test_lendable_never_negative():
    rm = RManager(0, 4, 2)
    rm.lend(1, "a", 2)
    rm.allocate_local("b", 2)
    assert rm.lendable == 0
    rm.lend_cap = 1  # a cap lowered below what is already lent
    assert rm.lendable == 0


def test_heartbeat_reports_counts():
    home, creditor = RManager(0, 4, 3), RManager(1, 6, 4)
    home.allocate_local("a", 1)
    home.borrow(creditor, "a", 2)
    s = home.heartbeat(5.0)
    assert (s.instance_id, s.num_blocks, s.num_free, s.num_lent, s.num_borrowed) == (0, 4, 3, 0, 2)
    assert s.lendable == 3 and s.num_home_requests == 1 and s.timestamp == 5.0
    c = creditor.heartbeat(6.0)
    assert (c.num_free, c.num_lent, c.lendable, c.num_home_requests) == (4, 2, 2, 0)


def test_ledger_views_are_copies():
    rm = RManager(1, 4, 3)
    rm.lend(0, "a", 1)
    rm.lent_ledger[0]["a"].append(99)
    assert rm.lent_ledger == {0: {"a": [0]}}


def test_bad_counts_rejected():
    rm = RManager(0, 4, 3)
    with pytest.raises(ValueError):
        rm.allocate_local("a", -1)
    with pytest.raises(ValueError):
        RManager(0, 4, -1)
