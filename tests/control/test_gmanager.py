"""GManager: the cluster view from Heartbeat messages only (ordering, liveness, placement map,
debt ledger, creditor candidates, the rebalancer's inputs)."""

import pytest

from infinite_llm.control.gmanager import GManager
from infinite_llm.control.messages import Heartbeat, InstanceLoad, RequestPlacement
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.rebalancer import RebalancerConfig

from tests.control.cluster_harness import Cluster, make_request


def beat(i, seq, lendable=0, free=None, blocks=16, load=None, placements=(), removed=(), t=0.0):
    return Heartbeat(
        instance=i, seq=seq, sent_time=t, num_blocks=blocks, num_free=lendable if free is None else free,
        num_lent=0, num_borrowed=0, lendable=lendable, load=load or InstanceLoad(),
        placements=list(placements), removed=list(removed),
    )


def placed(rid, home, tokens, movable=None):
    return RequestPlacement(rid, home, dict(tokens), dict(movable or {}))


# --------------------------------------------------------------------------- heartbeats
def test_heartbeat_and_status():
    g = GManager(2)
    assert g.status(0) is None
    assert g.heartbeat(beat(0, 1, lendable=5), now=1.0)
    assert g.status(0).lendable == 5 and g.status(1) is None


def test_older_or_repeated_heartbeats_are_ignored():
    g = GManager(1)
    assert g.heartbeat(beat(0, 5, lendable=5, placements=[placed("a", 0, {0: 4})]), now=2.0)
    assert not g.heartbeat(beat(0, 4, lendable=1, placements=[placed("b", 0, {0: 4})], removed=["a"]), now=3.0)
    assert not g.heartbeat(beat(0, 5, lendable=1), now=3.0)  # same seq: a duplicate
    assert g.status(0).lendable == 5
    assert g.requests() == ["a"]  # the stale beat's placement changes were not applied either
    assert g.alive_instances(now=12.5) == []  # nor did it count as a sign of life (received at 2.0)
    assert g.heartbeat(beat(0, 6, lendable=2), now=3.0)
    assert g.status(0).lendable == 2


def test_heartbeat_from_unknown_instance_rejected():
    with pytest.raises(ValueError, match="is not a member"):
        GManager(2).heartbeat(beat(2, 1), now=0.0)
    with pytest.raises(ValueError):
        GManager(0)
    with pytest.raises(ValueError):
        GManager(2, heartbeat_timeout_s=0)


def test_alive_instances_by_timeout():
    g = GManager(3, heartbeat_timeout_s=5.0)
    g.heartbeat(beat(0, 1), now=10.0)
    g.heartbeat(beat(1, 1), now=3.0)
    assert g.alive_instances(now=11.0) == [0]
    assert g.alive_instances(now=8.0) == [0, 1]
    g.heartbeat(beat(1, 2), now=11.0)  # heard again: alive again
    assert g.alive_instances(now=12.0) == [0, 1]


# --------------------------------------------------------------------------- placement map
def test_placements_and_removals():
    g = GManager(3)
    g.heartbeat(beat(0, 1, placements=[placed("a", 0, {0: 16, 1: 8}), placed("b", 0, {0: 4})]), now=0.0)
    assert g.placement("a") == {0: 16, 1: 8} and g.home_of("a") == 0
    assert sorted(g.requests()) == ["a", "b"]
    # A later beat carries only what changed.
    g.heartbeat(beat(0, 2, placements=[placed("a", 0, {0: 16, 2: 12})]), now=0.1)
    assert g.placement("a") == {0: 16, 2: 12} and g.placement("b") == {0: 4}
    # Only the home removes its request: another instance naming it changes nothing.
    g.heartbeat(beat(1, 1, removed=["a"]), now=0.2)
    assert g.home_of("a") == 0
    g.heartbeat(beat(0, 3, removed=["a", "never-seen"]), now=0.3)
    assert g.placement("a") == {} and g.home_of("a") is None and g.requests() == ["b"]
    # Removed and re-placed in one beat (preempted, then re-admitted): the placement stands.
    g.heartbeat(beat(0, 4, placements=[placed("b", 0, {0: 8})], removed=["b"]), now=0.4)
    assert g.placement("b") == {0: 8}


def test_debt_ledger():
    g = GManager(3)
    g.heartbeat(beat(0, 1, placements=[placed("a", 0, {0: 4, 1: 8, 2: 4}), placed("c", 0, {1: 4})]), now=0.0)
    g.heartbeat(beat(1, 1, placements=[placed("b", 1, {1: 4, 0: 12})]), now=0.0)
    g.heartbeat(beat(2, 1, placements=[placed("d", 2, {2: 40})]), now=0.0)
    assert g.debt_ledger() == {(0, 1): 12, (0, 2): 4, (1, 0): 12}  # mutual debts stay apart
    g.heartbeat(beat(0, 2, removed=["a"]), now=0.1)
    assert g.debt_ledger() == {(0, 1): 4, (1, 0): 12}


# --------------------------------------------------------------------------- creditors
def test_candidate_creditors_ordering():
    g = GManager(5)
    for i, lendable in enumerate([10, 3, 7, 7, 0]):  # 0 is the debtor; 4 has nothing to lend
        g.heartbeat(beat(i, 1, lendable=lendable), now=0.0)
    # Those that cover the request first (most lendable first, ties by id), then the rest.
    assert g.candidate_creditors(0, 5, now=0.0) == [(2, 7), (3, 7), (1, 3)]
    assert g.candidate_creditors(0, 5, now=0.0, exclude=[2]) == [(3, 7), (1, 3)]
    assert g.candidate_creditors(2, 3, now=0.0) == [(0, 10), (3, 7), (1, 3)]
    assert g.candidate_creditors(0, 8, now=0.0) == [(2, 7), (3, 7), (1, 3)]
    assert g.candidate_creditors(1, 8, now=0.0) == [(0, 10), (2, 7), (3, 7)]
    with pytest.raises(ValueError):
        g.candidate_creditors(0, -1, now=0.0)
    with pytest.raises(ValueError, match="is not a member"):
        g.candidate_creditors(9, 1, now=0.0)


def test_candidate_creditors_only_alive_instances():
    g = GManager(4, heartbeat_timeout_s=5.0)
    g.heartbeat(beat(1, 1, lendable=4), now=100.0)
    g.heartbeat(beat(2, 1, lendable=9), now=50.0)  # stopped reporting long ago: presumed dead
    # instance 3 never reported
    assert g.candidate_creditors(0, 1, now=101.0) == [(1, 4)]
    g.heartbeat(beat(2, 2, lendable=9), now=101.0)
    assert g.candidate_creditors(0, 1, now=102.0) == [(2, 9), (1, 4)]


# --------------------------------------------------------------------------- rebalancer inputs
def test_cluster_view():
    g = GManager(3)
    g.heartbeat(beat(0, 1, lendable=2, free=3, blocks=10,
                     load=InstanceLoad(batch_size=4, running_tokens=400, num_waiting=2, waiting_tokens=60,
                                       num_waiting_for_memory=2),
                     placements=[placed("a", 0, {0: 32, 1: 16}, {0: 7, 1: 4}), placed("x", 0, {0: 8, 2: 8})]),
                now=0.0)
    g.heartbeat(beat(1, 1, lendable=5, free=6, blocks=10, load=InstanceLoad(batch_size=2, running_tokens=50)),
                now=0.0)
    views, requests = g.cluster_view(block_size=4)
    assert [v.instance_id for v in views] == [0, 1]  # 2 never reported
    v0, v1 = views
    assert (v0.num_blocks, v0.num_free, v0.lendable, v0.batch_size, v0.num_waiting_for_memory) == (10, 3, 2, 4, 2)
    assert v0.avg_request_tokens == 30  # what it would admit: its waiting requests
    assert v1.avg_request_tokens == 25 and v1.num_waiting_for_memory == 0  # else its running ones
    # A request with blocks on an instance the gManager knows nothing about is left out.
    assert [(r.request_id, r.home, r.tokens_by_instance, r.movable_blocks) for r in requests] == [
        ("a", 0, {0: 32, 1: 16}, {0: 7, 1: 4})]
    empty = GManager(2)
    empty.heartbeat(beat(0, 1), now=0.0)
    assert empty.cluster_view(4)[0][0].avg_request_tokens == 0.0


def test_no_migration_planned_without_two_reporting_instances_or_memory_pressure():
    perf = PerfModel(t_fixed=1e-3, t_per_token=1e-5, t_per_seq=1e-5, t_per_kv_token=1e-7)
    g = GManager(2)
    g.heartbeat(beat(0, 1, lendable=4, free=4, load=InstanceLoad(batch_size=1, running_tokens=40),
                     placements=[placed("a", 0, {0: 40}, {0: 10})]), now=0.0)
    assert g.plan_migrations(perf, RebalancerConfig(block_size=4)) == []
    # Two instances, nobody waiting for memory, nothing split: nothing to gain by moving.
    g.heartbeat(beat(1, 1, lendable=16, free=16), now=0.0)
    assert g.plan_migrations(perf, RebalancerConfig(block_size=4)) == []


# --------------------------------------------------------------------------- fed by instances
def test_view_from_the_instances_heartbeats():
    c = Cluster(3, num_blocks=4, block_size=4)
    assert [c.gm.status(i).lendable for i in range(3)] == [4, 4, 4]
    homes = {0: {}, 1: {}}
    assert c[0].kv.allocate("a", 32)  # 8 blocks, larger than an instance: spread 3 / 3 / 2
    # 2 blocks, 1 free at home: borrows 1 from the first creditor the (not yet updated) view names
    assert c[1].kv.allocate("b", 8)
    homes[0]["a"] = _running("a", 32)
    homes[1]["b"] = _running("b", 8)
    c.beat(running=homes)
    assert c.gm.placement("a") == {0: 12, 1: 12, 2: 8} and c.gm.placement("b") == {0: 4, 1: 4}
    assert c.gm.debt_ledger() == {(0, 1): 12, (0, 2): 8, (1, 0): 4}
    assert [c.gm.status(i).lendable for i in range(3)] == [0, 0, 2]
    assert c.gm.candidate_creditors(1, 1, now=c.now) == [(2, 2)]
    c[0].kv.free("a")
    del homes[0]["a"]
    c.drain()
    c.beat(running=homes, via_network=True)
    assert c.gm.placement("a") != {}  # the beat is still on its way
    c.drain()
    assert c.gm.placement("a") == {} and c.gm.debt_ledger() == {(1, 0): 4}
    assert [c.gm.status(i).lendable for i in range(3)] == [3, 3, 4]


def _running(rid, tokens):
    request = make_request(rid, tokens)
    request.num_computed_tokens = tokens
    return request


# --------------------------------------------------------------------------- liveness
def test_liveness_alive_suspect_dead_by_heartbeat_age():
    g = GManager(2, heartbeat_timeout_s=3.0)
    assert g.liveness(0, now=0.0) == "starting"
    g.heartbeat(beat(0, 1), now=10.0)
    assert g.liveness(0, now=10.5) == "alive"
    assert g.liveness(0, now=11.5) == "suspect"  # later than a third of the timeout
    assert g.check_liveness(now=12.9) == []
    assert g.check_liveness(now=13.1) == [(0, "no heartbeat for 3.1 s")]
    assert g.liveness(0, now=13.1) == "dead"
    assert g.check_liveness(now=20.0) == []  # announced once
    assert g.liveness(1, now=20.0) == "starting"  # never heard from: not declared dead


def test_a_stalled_step_loop_is_dead_though_its_heartbeats_arrive():
    g = GManager(1, heartbeat_timeout_s=3.0)
    stalled = beat(0, 1)
    stalled.loop_age_s = 2.0
    g.heartbeat(stalled, now=1.0)
    assert g.liveness(0, now=1.0) == "suspect"
    assert g.check_liveness(now=1.5) == []
    later = beat(0, 2)
    later.loop_age_s = 3.2
    g.heartbeat(later, now=2.0)
    assert g.check_liveness(now=2.0) == [(0, "step loop stalled for 3.2 s")]


def test_dead_is_final_and_fences_heartbeats():
    g = GManager(3, heartbeat_timeout_s=5.0)
    for i in range(3):
        g.heartbeat(beat(i, 1, lendable=4), now=0.0)
    g.heartbeat(beat(0, 2, placements=[placed("a", 0, {0: 16, 2: 8}), placed("b", 0, {0: 8})]), now=0.1)
    g.heartbeat(beat(2, 2, placements=[placed("c", 2, {2: 8})]), now=0.1)
    assert g.declare_dead(2, "killed")
    assert not g.declare_dead(2, "again")
    assert g.dead == {2: "killed"}
    # Its own requests and those with KV on it are forgotten; "b" never touched it.
    assert sorted(g.requests()) == ["b"]
    assert not g.heartbeat(beat(2, 3), now=0.2)  # a resumed zombie's beat
    assert g.alive_instances(now=0.2) == [0, 1]
    assert [c for c, _ in g.candidate_creditors(0, 1, now=0.2)] == [1]
    views, _ = g.cluster_view(block_size=8)
    assert [v.instance_id for v in views] == [0, 1]


def test_added_instance_gets_a_new_id_and_is_judged_like_the_others():
    g = GManager(2, heartbeat_timeout_s=3.0)
    g.declare_dead(1, "killed")
    g.add_instance(2)
    with pytest.raises(ValueError, match="in use"):
        g.add_instance(1)  # ids are never reused
    assert g.members == [0, 1, 2] and g.live_members() == [0, 2]
    g.heartbeat(beat(2, 1, lendable=6), now=1.0)
    g.heartbeat(beat(0, 1, lendable=2), now=1.0)
    assert [c for c, _ in g.candidate_creditors(0, 4, now=1.5)] == [2]
    assert g.check_liveness(now=4.5) == [(0, "no heartbeat for 3.5 s"), (2, "no heartbeat for 3.5 s")]


def test_creditors_on_the_debtors_host_come_first():
    g = GManager(4)
    for i, (lendable, host) in enumerate([(0, "a"), (9, "b"), (5, "a"), (7, "b")]):
        b = beat(i, 1, lendable=lendable)
        b.host = host
        g.heartbeat(b, now=0.0)
    # All three cover 4 blocks; the one on host "a" first, then the rest by lendable.
    assert [c for c, _ in g.candidate_creditors(0, 4, now=0.0)] == [2, 1, 3]
    # Covering the request still beats sharing the host.
    assert [c for c, _ in g.candidate_creditors(0, 6, now=0.0)] == [1, 3, 2]
