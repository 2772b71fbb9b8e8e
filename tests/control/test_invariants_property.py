"""Property tests: the distributed KV cache stays consistent under any message order.

Instances talk only by messages (tests/control/cluster_harness: per-pair FIFO queues delivered in
random orders, synchronous borrows, late releases, attaches and block copies). Random operations
over 2-4 instances: requests homed at random with random sizes (homes fill up and borrow, and
instances borrow from each other both ways), growth by decode, aborts, preemption by recompute
and re-admission under the same request id, migration orders (home -> creditor, creditor ->
home, creditor -> third instance) carried out by each home's HomeMigrations at its step
boundaries with copies confirmed at random times (also after their request was freed or
restarted), and heartbeats that leave the gManager's view stale.

Whenever the network is drained: `check_cluster` holds (no block leaked or used twice, every
lent block in exactly one ledger on each side, guest indexes match the homes' tables), and every
computed block a home's table names holds that request's current KV (no stale copy committed).
After freeing everything, every pool is empty and no copy is left in flight.

Copies are written under the engine's guard (`RManager.accepts_copy`: only the copy a block was
reserved for may write it), so the content check also covers late copies landing in reused blocks.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.messages import MigrationOrder
from infinite_llm.control.request import Request
from infinite_llm.control.scheduler import RequestTooLongError

from tests.control.cluster_harness import Cluster, make_request

BLOCK_SIZE = 4

KINDS = ["step"] * 4 + ["deliver"] * 2 + ["beat", "order", "order", "order", "abort", "drain"]
ACTIONS = ["new", "new", "grow", "grow", "grow", "preempt", "readmit", "restart", "none"]


class _World:
    """A cluster driven at the HomeKV level: each home's step is commit -> its scheduling
    actions (admit, grow, preempt, re-admit) -> issue, as InstanceEngine.step orders them."""

    def __init__(self, num_instances: int, sizes: list[int], lend_fraction: float, seed: int) -> None:
        self.n = num_instances
        self.cluster = Cluster(num_instances, sizes, BLOCK_SIZE, "infinite", lend_fraction, seed=seed,
                               migration_tokens_per_step=2 * BLOCK_SIZE)
        self.running: list[dict[str, Request]] = [{} for _ in range(num_instances)]
        self.parked: list[dict[str, Request]] = [{} for _ in range(num_instances)]
        self.next_id = 0
        self.capacity = sum(sizes) * BLOCK_SIZE
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------- a home's scheduling actions
    def admit(self, home: int, request: Request, tokens: int) -> None:
        node = self.cluster[home]
        node.new_epoch(request.request_id)
        if node.grow(request.request_id, tokens):
            request.num_computed_tokens = tokens
            self.running[home][request.request_id] = request
            self.stats["split admissions"] += node.kv.is_split(request.request_id)
        else:  # refused: all or nothing
            assert not node.kv.block_table(request.request_id) and not node.kv.reservations(request.request_id)
            self.parked[home][request.request_id] = request
            self.stats["refused admissions"] += 1

    def act(self, home: int, action: str, x: int) -> None:
        node = self.cluster[home]
        running, parked = self.running[home], self.parked[home]
        if action == "new":
            rid = f"r{self.next_id}"
            self.next_id += 1
            tokens = 1 + x % max(1, self.capacity // 3)
            self.admit(home, make_request(rid, tokens), tokens)
        elif action == "grow" and running:
            rid = sorted(running)[x % len(running)]
            request = running[rid]
            target = request.num_computed_tokens + 1 + x % 6
            if node.grow(rid, target):
                request.num_computed_tokens = target
        elif action == "preempt" and running:
            rid = sorted(running)[x % len(running)]
            self.stats["preempted with copies in flight"] += any(
                c.request_id == rid for c in node.migrations.in_flight.values())
            node.kv.free(rid)  # preemption by recompute: the KV goes, the request stays
            request = running.pop(rid)
            request.num_computed_tokens = 0
            parked[rid] = request
        elif action == "readmit" and parked:
            rid = sorted(parked)[x % len(parked)]
            request = parked.pop(rid)
            self.admit(home, request, max(1, request.num_tokens + x % 5))
        elif action == "restart" and running:  # preempted and re-admitted within one step
            rid = sorted(running)[x % len(running)]
            self.act(home, "preempt", x)
            self.act(home, "readmit", sorted(parked).index(rid))

    def step(self, home: int, actions: list[str], x: int) -> None:
        mig = self.cluster[home].migrations
        mig.commit(self.running[home])
        for k, action in enumerate(actions):
            self.act(home, action, x + 7919 * k)
        mig.issue(self.running[home])

    # ------------------------------------------------------------- other operations
    def abort(self, home: int, x: int) -> None:
        pool = sorted(self.running[home]) + sorted(self.parked[home])
        if not pool:
            return
        rid = pool[x % len(pool)]
        self.cluster[home].kv.free(rid)
        self.running[home].pop(rid, None)
        self.parked[home].pop(rid, None)
        self.cluster[home].migrations.forget(rid)

    def order(self, x: int, y: int, z: int) -> None:
        homes = [h for h in range(self.n) if self.running[h]]
        if not homes:
            return
        home = homes[x % len(homes)]
        rid = sorted(self.running[home])[y % len(self.running[home])]
        holders = sorted(self.cluster[home].kv.holders(rid))
        src = holders[y % len(holders)] if z % 3 else y % self.n  # usually a holder, sometimes not
        dst = (src + 1 + z % (self.n - 1)) % self.n
        self.cluster[home].migrations.add_order(MigrationOrder(rid, src, dst, 1 + z % 4))

    def apply(self, kind: str, a: int, b: int, c: int, actions: list[str]) -> None:
        self.cluster.now += 0.01
        if kind == "step":
            self.step(a % self.n, actions, b)
        elif kind == "deliver":
            self.cluster.deliver(1 + b % 8)
        elif kind == "drain":
            self.check()
        elif kind == "beat":
            self.cluster.beat(via_network=bool(b % 2), running=dict(enumerate(self.running)))
        elif kind == "order":
            self.order(a, b, c)
        elif kind == "abort":
            self.abort(a % self.n, b)

    # ------------------------------------------------------------- checks
    def check(self) -> None:
        self.cluster.check()
        computed = {rid: r.num_computed_tokens for running in self.running for rid, r in running.items()}
        self.cluster.check_data(computed)
        lent_to = {(rm.instance_id, borrower) for rm in self.cluster.rms for borrower in rm.lent_ledger}
        self.stats["mutual borrowing"] += any((b, a) in lent_to for a, b in lent_to)
        self.stats["lent to a third instance"] += any(
            len({i for i in node.kv.holders(rid)} - {node.id}) > 1
            for node in self.cluster.nodes for rid in node.kv.requests())

    def finish(self) -> None:
        for home, node in enumerate(self.cluster.nodes):
            for rid in list(self.running[home]) + list(self.parked[home]):
                node.kv.free(rid)
                node.migrations.forget(rid)
            self.running[home].clear()
            self.parked[home].clear()
        self.cluster.drain()
        for node in self.cluster.nodes:
            node.migrations.commit({})
            self.stats["migrated blocks"] += node.migrations.num_migrated_blocks
            self.stats["dropped copies"] += node.migrations.num_dropped_copies
            self.stats["failed reservations"] += node.migrations.num_failed_reservations
        self.cluster.check()
        assert self.cluster.used_blocks() == [0] * self.n, self.cluster.used_blocks()
        for node in self.cluster.nodes:
            assert not node.migrations.in_flight, f"instance {node.id}: copies left in flight"
            assert node.rm.lent_ledger == {} and node.rm.borrowed_ledger == {}
            assert node.rm.num_lent == 0 and node.rm.num_borrowed == 0


_op = st.tuples(
    st.sampled_from(KINDS), st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16),
    st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_instances=st.integers(2, 4),
    sizes=st.lists(st.integers(4, 12), min_size=4, max_size=4),
    lend_fraction=st.sampled_from([0.5, 0.75, 1.0]),
    ops=st.lists(_op, min_size=20, max_size=120),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_borrow_release_migrate_abort_orders_keep_the_cluster_consistent(
        num_instances, sizes, lend_fraction, ops, seed):
    world = _World(num_instances, sizes[:num_instances], lend_fraction, seed)
    for kind, a, b, c, actions in ops:
        world.apply(kind, a, b, c, actions)
    world.check()
    world.finish()


def test_seeded_sweep_of_long_random_runs():
    """The same operations, drawn from fixed seeds in longer runs (deterministic, no shrinking):
    rare interleavings, e.g. a request restarted while its copies are in flight and a new copy
    reserving the same target block, need many steps. The sweep also checks it exercised them."""
    totals: Counter[str] = Counter()
    for seed in range(600):
        rng = random.Random(seed)
        n = rng.randint(2, 4)
        world = _World(n, [rng.randint(4, 12) for _ in range(n)], rng.choice([0.5, 0.75, 1.0]), seed)
        try:
            for _ in range(rng.randint(40, 120)):
                world.apply(rng.choice(KINDS), *(rng.randint(0, 2**16) for _ in range(3)),
                            [rng.choice(ACTIONS) for _ in range(rng.randint(1, 3))])
            world.check()
            world.finish()
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
        totals.update(world.stats)
    for what in ("mutual borrowing", "lent to a third instance", "split admissions", "refused admissions",
                 "migrated blocks", "dropped copies", "failed reservations", "preempted with copies in flight"):
        assert totals[what] >= 20, f"the sweep rarely exercised {what!r}: {dict(totals)}"


# --------------------------------------------------------------------------- with schedulers
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_instances=st.integers(2, 4),
    shapes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 60), st.integers(1, 8)), min_size=2, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_independent_schedulers_with_migrations_finish_without_leaks(num_instances, shapes, seed):
    """Per-instance Schedulers (their own budgets, chunked prefill, preemption) stepped in a random
    interleaving, random migration orders and aborts, random deliveries: the invariants hold at
    every quiescent point, every request finishes, and nothing is left allocated."""
    rng = random.Random(seed)
    c = Cluster(num_instances, 10, BLOCK_SIZE, "infinite", 0.75, seed=seed,
                scheduler=SchedulerConfig(max_num_batched_tokens=12, max_num_seqs=4),
                migration_tokens_per_step=2 * BLOCK_SIZE)
    accepted = []
    for i, (home, prompt_len, max_tokens) in enumerate(shapes):
        request = make_request(f"r{i}", prompt_len, max_tokens)
        try:
            c[home % num_instances].scheduler.add_request(request)
            accepted.append(request)
        except RequestTooLongError:
            pass
    for _ in range(3000):
        live = [node for node in c.nodes if node.scheduler.has_unfinished() or node.migrations.busy()]
        if not live:
            break
        c.now += 0.01
        roll = rng.random()
        if roll < 0.5:
            rng.choice(live).step()
        elif roll < 0.7:
            c.deliver(rng.randint(1, 6))
        elif roll < 0.8:
            node = rng.choice(c.nodes)
            if node.scheduler.running:
                r = rng.choice(node.scheduler.running)
                holders = sorted(node.kv.holders(r.request_id))
                src = rng.choice(holders)
                dst = rng.choice([i for i in range(num_instances) if i != src])
                node.migrations.add_order(MigrationOrder(r.request_id, src, dst, rng.randint(1, 3)))
        elif roll < 0.83:
            node = rng.choice(c.nodes)
            if node.scheduler.running:
                rid = rng.choice(node.scheduler.running).request_id
                node.scheduler.abort(rid)
                node.migrations.forget(rid)
        elif roll < 0.9:
            c.beat(via_network=rng.random() < 0.5)
        else:
            c.check()
            c.check_data({r.request_id: r.num_computed_tokens for node in c.nodes for r in node.scheduler.running})
    assert not any(node.scheduler.has_unfinished() for node in c.nodes), "a scheduler livelocked"
    c.drain()
    for node in c.nodes:
        node.migrations.commit({})
        assert not node.migrations.in_flight
    c.check()
    assert c.used_blocks() == [0] * num_instances
    for request in accepted:
        assert request.is_finished
        if request.finish_reason.value == "length":
            assert len(request.output_token_ids) == request.sampling.max_tokens
