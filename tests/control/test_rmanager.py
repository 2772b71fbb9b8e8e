"""RManager: one instance's pool, lend cap, both ledgers, guest index (positions of lent blocks),
reservations and attach; and the creditor side of the protocol (control/creditor.py)."""

import pytest

from infinite_llm.control import creditor
from infinite_llm.control.messages import AttachBlock, BorrowRequest, ReleaseBlocks
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import RManager


def refs(instance, ids):
    return [BlockRef(instance, b) for b in ids]


# --------------------------------------------------------------------------- local allocation
def test_allocate_local_and_release():
    rm = RManager(0, num_blocks=4, lend_cap=2)
    got = rm.allocate_local("a", 3)
    assert got == refs(0, [0, 1, 2])
    assert rm.blocks_held("a") == got and rm.own_blocks() == {"a": [0, 1, 2]}
    assert rm.num_free == 1 and rm.num_lent == 0
    assert rm.allocate_local("b", 2) is None  # not enough free: refused, nothing taken
    assert rm.num_free == 1
    rm.release("a", got[:2])
    assert rm.blocks_held("a") == [BlockRef(0, 2)]
    assert rm.num_free == 3
    assert rm.home_requests() == ["a"]


def test_local_allocation_ignores_lend_cap():
    rm = RManager(0, num_blocks=4, lend_cap=1)
    assert rm.allocate_local("a", 4) is not None
    assert rm.lendable == 0


# --------------------------------------------------------------------------- lending
def test_lend_with_positions_fills_the_guest_index():
    rm = RManager(1, num_blocks=8, lend_cap=5)
    got = rm.lend(0, "a", 3, indices=[4, 5, 6])
    assert got == refs(1, [0, 1, 2])
    assert rm.num_lent == 3 and rm.lendable == 2
    assert rm.lent_ledger == {0: {"a": [0, 1, 2]}}
    assert rm.guest_blocks("a") == [(4, 0), (5, 1), (6, 2)]
    assert all(rm.holds("a", b) for b in (0, 1, 2)) and not rm.holds("b", 0)


def test_guest_blocks_are_ordered_by_table_position_not_by_arrival():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    rm.lend(0, "a", 2, indices=[7, 3])
    rm.lend(0, "a", 1, indices=[5])
    rm.lend(2, "b", 1, indices=[0])
    assert rm.guest_blocks("a") == [(3, 1), (5, 2), (7, 0)]
    assert rm.guest_blocks("b") == [(0, 3)]
    assert rm.guest_blocks("nobody") == []
    # Releasing a block takes its position out of the index; the rest stays ordered.
    rm.release("a", [BlockRef(1, 2)])
    assert rm.guest_blocks("a") == [(3, 1), (7, 0)]


def test_lend_position_errors_take_nothing():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    rm.lend(0, "a", 2, indices=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        rm.lend(0, "a", 2, indices=[2, 2])
    with pytest.raises(ValueError, match="distinct"):
        rm.lend(0, "a", 2, indices=[2])
    with pytest.raises(ValueError, match=r"already has blocks here at positions \[1\]"):
        rm.lend(0, "a", 2, indices=[1, 2])
    assert rm.num_lent == 2 and rm.num_free == 6
    assert rm.guest_blocks("a") == [(0, 0), (1, 1)]


def test_lend_refused_past_lend_cap():
    rm = RManager(1, num_blocks=8, lend_cap=4)
    assert rm.lend(0, "a", 3, indices=[0, 1, 2]) is not None
    assert rm.lend(2, "b", 2, indices=[0, 1]) is None  # 3 + 2 > cap 4
    assert rm.num_lent == 3 and rm.num_free == 5
    assert rm.guest_blocks("b") == []  # a refusal records no positions
    assert rm.lend(2, "b", 1, indices=[0]) is not None  # exactly at the cap is allowed
    assert rm.lendable == 0
    assert rm.allocate_local("own", 4) is not None  # the cap limits only what others take


def test_lend_refused_when_creditor_full():
    rm = RManager(1, num_blocks=4, lend_cap=4)
    rm.allocate_local("own", 3)
    assert rm.lendable == 1
    assert rm.lend(0, "a", 2, indices=[0, 1]) is None
    assert rm.num_free == 1 and rm.lent_ledger == {}


def test_lending_to_self_or_a_bad_borrower_is_an_error():
    with pytest.raises(ValueError, match="itself"):
        RManager(0, 4, 2).lend(0, "a", 1)
    with pytest.raises(ValueError, match=">= 0"):
        RManager(0, 4, 2).lend(-1, "a", 1)


def test_lendable_never_negative():
    rm = RManager(0, 4, 2)
    rm.lend(1, "a", 2)
    rm.allocate_local("b", 2)
    assert rm.lendable == 0
    rm.lend_cap = 1  # a cap lowered below what is already lent
    assert rm.lendable == 0


# --------------------------------------------------------------------------- reserve / attach
def test_reserve_then_attach():
    rm = RManager(2, num_blocks=6, lend_cap=3)
    got = rm.reserve(0, "a", 2)
    assert got == refs(2, [0, 1])
    assert rm.num_lent == 2 and rm.lent_ledger == {0: {"a": [0, 1]}}
    assert rm.guest_blocks("a") == []  # reserved: held, but no position yet
    assert rm.holds("a", 0) and rm.holds("a", 1)
    rm.attach("a", 9, 1)
    assert rm.guest_blocks("a") == [(9, 1)]
    rm.attach("a", 4, 0)
    assert rm.guest_blocks("a") == [(4, 0), (9, 1)]
    assert rm.reserve(0, "a", 2) is None  # reservations count against the lend cap


def test_reserve_for_a_request_homed_here_is_a_local_allocation():
    rm = RManager(2, num_blocks=6, lend_cap=1)
    assert rm.reserve(2, "b", 3) == refs(2, [0, 1, 2])  # a block moving back home: no cap
    assert rm.num_lent == 0 and rm.own_blocks() == {"b": [0, 1, 2]}


def test_attach_validation():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    rm.reserve(0, "a", 2)  # blocks 0, 1
    rm.allocate_local("own", 1)  # block 2
    rm.lend(0, "b", 1, indices=[0])  # block 3
    with pytest.raises(ValueError, match="not lent for 'a'"):
        rm.attach("a", 0, 5)  # never allocated
    with pytest.raises(ValueError, match="not lent for 'own'"):
        rm.attach("own", 0, 2)  # an own block is never a guest
    with pytest.raises(ValueError, match="not lent for 'a'"):
        rm.attach("a", 0, 3)  # lent, but for another request
    rm.attach("a", 0, 0)
    with pytest.raises(ValueError, match="already attached"):
        rm.attach("a", 0, 1)  # position taken
    with pytest.raises(ValueError, match="already attached"):
        rm.attach("a", 1, 0)  # block placed already
    assert rm.guest_blocks("a") == [(0, 0)]
    assert rm.guest_blocks("b") == [(0, 3)]


def test_only_the_copy_a_block_was_reserved_for_may_write_it():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    assert rm.reserve(0, "a", 2, copy_tags=[10, 11]) == refs(1, [0, 1])
    assert rm.accepts_copy("a", 0, 10) and rm.accepts_copy("a", 1, 11)
    assert not rm.accepts_copy("a", 0, 11)  # another copy's block
    assert not rm.accepts_copy("b", 0, 10)  # another request
    assert not rm.accepts_copy("a", 2, 10)  # not allocated
    rm.lend(0, "a", 1, indices=[0])  # block 2: a live block, never a copy target
    assert not rm.accepts_copy("a", 2, 10)
    rm.attach("a", 5, 0)  # committed: the block is live now
    assert not rm.accepts_copy("a", 0, 10)
    # Freed and reserved again for a newer copy: the old copy's tag no longer fits.
    rm.release("a", [BlockRef(1, 1)])
    assert not rm.accepts_copy("a", 1, 11)
    assert rm.reserve(0, "a", 1, copy_tags=[12]) == refs(1, [1])
    assert not rm.accepts_copy("a", 1, 11) and rm.accepts_copy("a", 1, 12)
    # A block moving back home is reserved locally, with its copy's tag as well.
    assert rm.reserve(1, "own", 1, copy_tags=[3]) == refs(1, [3])
    assert rm.accepts_copy("own", 3, 3) and rm.num_lent == 3
    with pytest.raises(ValueError, match="copy tags"):
        rm.reserve(0, "a", 2, copy_tags=[1])
    assert rm.num_free == 4
    assert rm.reserve(0, "a", 9, copy_tags=list(range(9))) is None


def test_holds_covers_own_lent_and_reserved_blocks():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    rm.allocate_local("own", 1)  # 0
    rm.lend(0, "a", 1, indices=[0])  # 1
    rm.reserve(2, "a", 1)  # 2
    assert rm.holds("own", 0) and rm.holds("a", 1) and rm.holds("a", 2)
    assert not rm.holds("a", 0) and not rm.holds("own", 1) and not rm.holds("a", 3)
    rm.release("a", [BlockRef(1, 1)])
    assert not rm.holds("a", 1)


# --------------------------------------------------------------------------- release paths
def test_release_of_lent_block_then_forget_borrowed():
    home, lender = RManager(0, 4, 3), RManager(1, 4, 3)
    got = lender.lend(0, "a", 3, indices=[0, 1, 2])
    home.record_borrowed("a", 1, got)
    assert home.borrowed_ledger == {"a": {1: [0, 1, 2]}} and home.num_borrowed == 3
    assert home.num_free == 4  # borrowing takes nothing from the borrower's own pool
    lender.release("a", got[1:2])
    home.forget_borrowed("a", 1, got[1:2])
    assert lender.lent_ledger == {0: {"a": [0, 2]}}
    assert home.borrowed_ledger == {"a": {1: [0, 2]}}
    assert lender.num_lent == 2 and home.num_borrowed == 2
    assert lender.guest_blocks("a") == [(0, 0), (2, 2)]
    lender.release("a", [got[0], got[2]])
    home.forget_borrowed("a", 1, [got[0], got[2]])
    assert lender.lent_ledger == {} and home.borrowed_ledger == {}
    assert lender.guest_blocks("a") == [] and lender.num_free == 4


def test_record_borrowed_validation():
    rm = RManager(0, 4, 3)
    with pytest.raises(ValueError, match="not on creditor instance 1"):
        rm.record_borrowed("a", 1, [BlockRef(2, 0)])
    with pytest.raises(ValueError, match="own creditor"):
        rm.record_borrowed("a", 0, [BlockRef(0, 0)])
    assert rm.borrowed_ledger == {} and rm.num_borrowed == 0


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


def test_forget_borrowed_unknown_raises_and_changes_nothing():
    rm = RManager(0, 4, 3)
    rm.record_borrowed("a", 1, refs(1, [0, 1]))
    with pytest.raises(ValueError, match="not recorded"):
        rm.forget_borrowed("a", 1, [BlockRef(1, 0), BlockRef(1, 5)])
    with pytest.raises(ValueError, match="not recorded"):
        rm.forget_borrowed("a", 2, [BlockRef(2, 0)])
    with pytest.raises(ValueError, match="not recorded"):
        rm.forget_borrowed("a", 1, [BlockRef(1, 0), BlockRef(1, 0)])
    assert rm.borrowed_ledger == {"a": {1: [0, 1]}} and rm.num_borrowed == 2


def test_free_request_frees_own_and_lent():
    rm = RManager(1, 8, 6)
    own = rm.allocate_local("a", 2)
    lent = rm.lend(0, "b", 2, indices=[0, 1])
    rm.lend(2, "c", 1, indices=[0])
    assert rm.free_request("a") == own
    assert rm.free_request("b") == lent
    assert rm.free_request("b") == []  # idempotent
    assert rm.num_free == 7 and rm.num_lent == 1
    assert rm.lent_ledger == {2: {"c": [4]}} and rm.guest_blocks("b") == []


def test_release_lent_all_or_listed():
    rm = RManager(1, 8, 8)
    rm.lend(0, "a", 3, indices=[0, 1, 2])
    rm.lend(2, "a", 1, indices=[3])  # the same request id from another borrower is not touched
    assert rm.release_lent(0, "a", [1]) == [1]
    assert rm.lent_ledger == {0: {"a": [0, 2]}, 2: {"a": [3]}}
    assert rm.release_lent(0, "a") == [0, 2]
    assert rm.lent_ledger == {2: {"a": [3]}}
    assert rm.release_lent(0, "a") == []  # nothing left: a no-op


# --------------------------------------------------------------------------- creditor protocol
def test_creditor_borrow_grants_with_positions_or_reserves():
    rm = RManager(1, num_blocks=6, lend_cap=4)
    reply = creditor.on_borrow(rm, BorrowRequest(tag=7, borrower=0, request_id="a", num_blocks=2, indices=[5, 6]))
    assert (reply.tag, reply.creditor, reply.request_id, reply.blocks) == (7, 1, "a", [0, 1])
    assert rm.guest_blocks("a") == [(5, 0), (6, 1)]
    reply = creditor.on_borrow(rm, BorrowRequest(tag=8, borrower=0, request_id="a", num_blocks=1, copy_tags=[3]))
    assert reply.blocks == [2] and rm.guest_blocks("a") == [(5, 0), (6, 1)]  # a reservation
    assert rm.accepts_copy("a", 2, 3) and not rm.accepts_copy("a", 0, 3)
    creditor.on_attach(rm, AttachBlock(borrower=0, request_id="a", index=2, block=2))
    assert rm.guest_blocks("a") == [(2, 2), (5, 0), (6, 1)]
    reply = creditor.on_borrow(rm, BorrowRequest(tag=9, borrower=2, request_id="b", num_blocks=2, indices=[0, 1]))
    assert reply.blocks is None  # past the lend cap of 4: refused
    assert rm.num_lent == 3 and rm.lent_ledger == {0: {"a": [0, 1, 2]}}


def test_creditor_release_is_idempotent():
    rm = RManager(1, num_blocks=8, lend_cap=8)
    rm.lend(0, "a", 3, indices=[0, 1, 2])  # blocks 0, 1, 2
    rm.lend(2, "b", 1, indices=[0])  # block 3
    assert creditor.on_release(rm, ReleaseBlocks(0, "a", [1])) == [1]
    # A duplicate, late or mis-addressed release names blocks no longer held for that borrower
    # and request: they are ignored, nothing else is touched.
    assert creditor.on_release(rm, ReleaseBlocks(0, "a", [1])) == []
    assert creditor.on_release(rm, ReleaseBlocks(0, "a", [1, 3, 99])) == []  # 3 is b's, 99 unknown
    assert creditor.on_release(rm, ReleaseBlocks(2, "a", [0])) == []  # 0 is lent to 0, not 2
    assert rm.lent_ledger == {0: {"a": [0, 2]}, 2: {"b": [3]}}
    assert creditor.on_release(rm, ReleaseBlocks(0, "a", [2, 1])) == [2]  # only what is held
    assert creditor.on_release(rm, ReleaseBlocks(0, "a")) == [0]  # None: all of it
    assert creditor.on_release(rm, ReleaseBlocks(0, "a")) == []
    assert creditor.on_release(rm, ReleaseBlocks(0, "never-lent")) == []
    assert rm.lent_ledger == {2: {"b": [3]}} and rm.num_lent == 1 and rm.num_free == 7
    assert rm.guest_blocks("a") == []


# --------------------------------------------------------------------------- views and errors
def test_ledger_views_are_copies():
    rm = RManager(1, 4, 3)
    rm.lend(0, "a", 1)
    rm.lent_ledger[0]["a"].append(99)
    rm.own_blocks().setdefault("x", []).append(1)
    assert rm.lent_ledger == {0: {"a": [0]}} and rm.own_blocks() == {}
    rm.record_borrowed("z", 2, [BlockRef(2, 0)])
    rm.borrowed_ledger["z"][2].append(5)
    assert rm.borrowed_ledger == {"z": {2: [0]}}


def test_bad_counts_rejected():
    rm = RManager(0, 4, 3)
    with pytest.raises(ValueError):
        rm.allocate_local("a", -1)
    with pytest.raises(TypeError):
        rm.lend(1, "a", 1.5)
    with pytest.raises(ValueError):
        RManager(0, 4, -1)
    with pytest.raises(ValueError):
        RManager(-1, 4, 1)
    assert rm.allocate_local("a", 0) == [] and rm.num_free == 4
