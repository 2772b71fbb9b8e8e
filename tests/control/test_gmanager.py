"""GManager: heartbeats, liveness, placement map, debt ledger, creditor ranking."""

import pytest

from infinite_llm.control.gmanager import GManager
from infinite_llm.control.plan import BlockRef
from infinite_llm.control.rmanager import InstanceStatus


def status(i, lendable, t=0.0, free=None):
    return InstanceStatus(
        instance_id=i, num_blocks=16, num_free=lendable if free is None else free, num_lent=0,
        num_borrowed=0, lendable=lendable, num_home_requests=0, num_home_tokens=0, timestamp=t,
    )


def test_heartbeat_and_status():
    g = GManager(2)
    assert g.status(0) is None
    g.heartbeat(status(0, 5, t=1.0))
    assert g.status(0).lendable == 5


def test_out_of_order_heartbeat_ignored():
    g = GManager(1)
    g.heartbeat(status(0, 5, t=2.0))
    g.heartbeat(status(0, 1, t=1.0))
    assert g.status(0).lendable == 5


def test_heartbeat_from_unknown_instance_rejected():
    with pytest.raises(ValueError, match="out of range"):
        GManager(2).heartbeat(status(2, 1))


def test_alive_instances_by_timeout():
    g = GManager(3, heartbeat_timeout_s=5.0)
    g.heartbeat(status(0, 1, t=10.0))
    g.heartbeat(status(1, 1, t=3.0))
    assert g.alive_instances(now=11.0) == [0]
    assert g.alive_instances(now=8.0) == [0, 1]


def test_candidate_creditors_ranking():
    g = GManager(5)
    g.heartbeat(status(0, 10))  # the debtor itself
    g.heartbeat(status(1, 3))
    g.heartbeat(status(2, 7))
    g.heartbeat(status(3, 7))
    g.heartbeat(status(4, 0))  # nothing to lend
    assert g.candidate_creditors(0, 5) == [2, 3, 1]
    assert g.candidate_creditors(0, 5, exclude=[2]) == [3, 1]
    assert g.candidate_creditors(2, 3) == [0, 3, 1]


def test_candidates_that_cover_the_request_come_first():
    g = GManager(3)
    g.heartbeat(status(1, 4))
    g.heartbeat(status(2, 9))
    assert g.candidate_creditors(0, 4) == [2, 1]
    assert g.candidate_creditors(0, 20) == [2, 1]


def test_candidates_skip_silent_and_stale_instances():
    g = GManager(4, heartbeat_timeout_s=5.0)
    g.heartbeat(status(1, 4, t=100.0))
    g.heartbeat(status(2, 9, t=50.0))  # stopped reporting long ago: presumed dead
    # instance 3 never reported
    assert g.candidate_creditors(0, 1) == [1]


def test_placement_map_and_debt_ledger():
    g = GManager(3)
    g.record_placement("a", 0, [BlockRef(0, 0), BlockRef(1, 0), BlockRef(1, 1)])
    g.record_placement("a", 0, [BlockRef(2, 5)])
    g.record_placement("b", 1, [BlockRef(1, 2), BlockRef(0, 1)])
    assert g.placement("a") == {0: 1, 1: 2, 2: 1}
    assert g.home_of("a") == 0 and g.home_of("b") == 1
    assert g.debt_ledger() == {(0, 1): 2, (0, 2): 1, (1, 0): 1}
    g.remove_placement("a", [BlockRef(1, 0)])
    assert g.debt_ledger() == {(0, 1): 1, (0, 2): 1, (1, 0): 1}
    g.remove_placement("a")
    assert g.placement("a") == {} and g.home_of("a") is None
    g.remove_placement("a")  # idempotent
    assert g.debt_ledger() == {(1, 0): 1}


def test_removing_last_blocks_forgets_request():
    g = GManager(2)
    g.record_placement("a", 1, [BlockRef(0, 3)])
    g.remove_placement("a", [BlockRef(0, 3)])
    assert g.requests() == [] and g.home_of("a") is None


def test_placement_errors():
    g = GManager(2)
    g.record_placement("a", 0, [BlockRef(0, 0)])
    with pytest.raises(ValueError, match="homed on instance 0"):
        g.record_placement("a", 1, [BlockRef(1, 0)])
    with pytest.raises(ValueError, match="only 0"):
        g.remove_placement("a", [BlockRef(1, 0)])
    with pytest.raises(ValueError, match="no recorded placement"):
        g.remove_placement("zzz", [BlockRef(1, 0)])
    with pytest.raises(ValueError, match="out of range"):
        g.record_placement("b", 0, [BlockRef(7, 0)])
    assert g.placement("a") == {0: 1}
