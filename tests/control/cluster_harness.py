"""A pure-Python cluster of control planes that talk by messages (no torch), for tests.

`Cluster(n, ...)` builds N `Node`s, each with its own RManager and HomeKV (plus a Scheduler and
HomeMigrations when asked), and one `Network` that carries every message between them:

- one FIFO queue per ordered pair (self-pairs included), the transport's only guarantee;
- delivery order is random but consistent with per-pair FIFO: each delivery pops the head of a
  randomly chosen non-empty queue (a seeded `random.Random`, so a failure replays);
- `borrow()` is synchronous for the caller, as in the instance engine: it sends a
  `BorrowRequest` and then delivers pending messages (anyone's, in random order) until the reply
  arrives. Releases, attaches and block copies are only queued; tests deliver them with
  `deliver()` / `drain()` whenever they like, which models their arbitrary lateness.

Block copies follow the engine's protocol (`CopyBlock` home -> source, `BlockData` source ->
target, `CopyDone` target -> home; the source reads only a block it still holds for the request,
the target writes only a block reserved for that very copy, `RManager.accepts_copy`) and carry a
content label, so tests can check that a committed copy holds the right data: a home "computes"
tokens by writing `(request_id, epoch, table position)` into the blocks it fills.

The gManager is fed heartbeats built from the nodes (`beat()`), so its view lags the nodes
exactly as much as a test lets it; `creditors()` answers with `candidate_creditors`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from typing import Any, Callable, Optional

from infinite_llm.config import SchedulerConfig
from infinite_llm.control import creditor
from infinite_llm.control import messages as m
from infinite_llm.control.gmanager import GManager
from infinite_llm.control.home_kv import HomeKV, lend_cap_for
from infinite_llm.control.invariants import check_cluster
from infinite_llm.control.migration import HomeMigrations
from infinite_llm.control.plan import BlockRef, SampleResult
from infinite_llm.control.request import Request
from infinite_llm.control.rmanager import RManager
from infinite_llm.control.scheduler import Scheduler, SchedulerOutput
from infinite_llm.sampling import SamplingParams

GM = "gm"


class Network:
    """Per ordered pair FIFO queues, delivered in a seeded random order."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[tuple[Any, Any], deque] = {}
        self.handlers: dict[Any, Callable[[Any, Any], None]] = {}
        self.sent: list[tuple[Any, Any, Any]] = []  # (src, dst, message), for tests that inspect
        self.delivered = 0
        # (src, dst, head) -> True holds that queue back from every delivery, synchronous borrows
        # included, until the test clears it: a message the test wants late.
        self.hold: Optional[Callable[[Any, Any, Any], bool]] = None

    def register(self, address: Any, handler: Callable[[Any, Any], None]) -> None:
        self.handlers[address] = handler

    def send(self, src: Any, dst: Any, message: Any) -> None:
        if dst not in self.handlers:
            raise ValueError(f"no node at address {dst!r}")
        self.queues.setdefault((src, dst), deque()).append(message)
        self.sent.append((src, dst, message))

    def deliver_one(self, keep: Optional[Callable[[Any, Any, Any], bool]] = None) -> bool:
        """Deliver the head of one random non-empty queue. `keep(src, dst, head)` True holds that
        queue back this time (a message the test wants late). Returns whether one was delivered."""
        held = [p for p in (keep, self.hold) if p is not None]
        ready = [
            pair for pair, q in self.queues.items()
            if q and not any(p(pair[0], pair[1], q[0]) for p in held)
        ]
        if not ready:
            return False
        src, dst = self.rng.choice(sorted(ready, key=repr))
        message = self.queues[(src, dst)].popleft()
        self.delivered += 1
        self.handlers[dst](src, message)
        return True

    def deliver(self, n: int, keep: Optional[Callable[[Any, Any, Any], bool]] = None) -> int:
        done = 0
        while done < n and self.deliver_one(keep):
            done += 1
        return done

    def drain(self, keep: Optional[Callable[[Any, Any, Any], bool]] = None, limit: int = 1_000_000) -> int:
        done = 0
        while self.deliver_one(keep):
            done += 1
            if done > limit:
                raise RuntimeError("the network does not quiesce")
        return done

    def deliver_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if not self.deliver_one():
                raise RuntimeError("waiting for a reply that can never arrive (nothing left to deliver)")


class Node:
    """One instance's control state, its message pump and its PeerLink / CopyLink."""

    def __init__(self, cluster: "Cluster", instance: int, num_blocks: int, lend_cap: int,
                 headroom_fraction: float = 0.0) -> None:
        self.cluster = cluster
        self.id = instance
        self.net = cluster.net
        self.rm = RManager(instance, num_blocks, lend_cap)
        self.kv = HomeKV(self.rm, cluster.block_size, cluster.placement, cluster.num_instances,
                         self if cluster.num_instances > 1 or cluster.placement != "static" else None,
                         headroom_fraction=headroom_fraction)
        self.scheduler: Optional[Scheduler] = None
        self.migrations: Optional[HomeMigrations] = None
        self.data: dict[int, Any] = {}  # block id -> content label (what its KV "is")
        self.epochs: dict[str, int] = {}  # request -> how often its KV was (re)started here
        self.computed: dict[str, int] = {}  # request -> tokens written so far (direct-KV tests)
        self._tags = itertools.count()
        self._replies: dict[int, m.BorrowReply] = {}
        self.refuse_to: set[int] = set()  # borrowers this node refuses whatever it has (test hook)
        self.heartbeat_seq = itertools.count(1)
        self._reported: dict[str, m.RequestPlacement] = {}
        self.net.register(instance, self.handle)

    # ------------------------------------------------------------------ message pump
    def handle(self, src: Any, msg: Any) -> None:
        if isinstance(msg, m.BorrowRequest):
            if msg.borrower in self.refuse_to:
                reply = m.BorrowReply(msg.tag, self.id, msg.request_id, None)
            else:
                reply = creditor.on_borrow(self.rm, msg)
            self.net.send(self.id, msg.borrower, reply)
        elif isinstance(msg, m.BorrowReply):
            self._replies[msg.tag] = msg
        elif isinstance(msg, m.ReleaseBlocks):
            creditor.on_release(self.rm, msg)
        elif isinstance(msg, m.AttachBlock):
            creditor.on_attach(self.rm, msg)
        elif isinstance(msg, m.CopyBlock):
            if not self.rm.holds(msg.request_id, msg.src_block):
                self.net.send(self.id, msg.home, m.CopyDone(msg.tag, self.id, msg.request_id, ok=False))
                return
            payload = self.data.get(msg.src_block)
            self.net.send(self.id, msg.dst, m.BlockData(msg.tag, self.id, msg.home, msg.request_id, msg.dst_block, payload))
        elif isinstance(msg, m.BlockData):
            # InstanceEngine._on_block_data: only the copy the block was reserved for may write it.
            ok = self.rm.accepts_copy(msg.request_id, msg.dst_block, msg.tag)
            if ok:
                self.data[msg.dst_block] = msg.payload
            self.net.send(self.id, msg.home, m.CopyDone(msg.tag, self.id, msg.request_id, ok))
        elif isinstance(msg, m.CopyDone):
            assert self.migrations is not None
            self.migrations.copy_done(msg.tag, msg.ok)
        else:
            raise TypeError(f"node {self.id}: unexpected message {msg!r}")

    # ------------------------------------------------------------------ PeerLink
    def creditors(self, num_blocks: int) -> list[tuple[int, int]]:
        return self.cluster.gm.candidate_creditors(self.id, num_blocks, self.cluster.now)

    def borrow(self, creditor_id: int, request_id: str, num_blocks: int, indices: Optional[list[int]],
               copy_tags: Optional[list[int]] = None, yields: bool = False) -> Optional[list[int]]:
        tag = next(self._tags)
        self.net.send(self.id, creditor_id,
                      m.BorrowRequest(tag, self.id, request_id, num_blocks, indices, copy_tags, yields))
        self.net.deliver_until(lambda: tag in self._replies)
        return self._replies.pop(tag).blocks

    def release(self, creditor_id: int, request_id: str, blocks: Optional[list[int]]) -> None:
        self.net.send(self.id, creditor_id, m.ReleaseBlocks(self.id, request_id, blocks))

    def attach(self, holder: int, request_id: str, index: int, block: int) -> None:
        self.net.send(self.id, holder, m.AttachBlock(self.id, request_id, index, block))

    # ------------------------------------------------------------------ CopyLink
    def start_copy(self, tag: int, request_id: str, src: BlockRef, dst: BlockRef) -> None:
        self.net.send(self.id, src.instance, m.CopyBlock(tag, self.id, request_id, src.block, dst.instance, dst.block))

    # ------------------------------------------------------------------ KV writes ("compute")
    def new_epoch(self, request_id: str) -> None:
        """The request's KV starts over (admission, or re-admission after preemption)."""
        self.epochs[request_id] = self.epochs.get(request_id, 0) + 1
        self.computed[request_id] = 0

    def write(self, request_id: str, start: int, end: int) -> None:
        """The home computed tokens [start, end): their blocks get this epoch's labels (on the
        holders, as the attention service writes new K/V there)."""
        bs = self.cluster.block_size
        table = self.kv.block_table(request_id)
        epoch = self.epochs.get(request_id, 0)
        for index in range(start // bs, -(-end // bs)):
            ref = table[index]
            self.cluster.nodes[ref.instance].data[ref.block] = (request_id, epoch, index)

    def grow(self, request_id: str, total_tokens: int) -> bool:
        """Allocate up to `total_tokens` and compute them (direct-KV tests, no scheduler)."""
        if not self.kv.allocate(request_id, total_tokens):
            return False
        done = self.computed.setdefault(request_id, 0)
        if total_tokens > done:
            self.write(request_id, done, total_tokens)
            self.computed[request_id] = total_tokens
        return True

    # ------------------------------------------------------------------ scheduler step
    def step(self, token: int = 7) -> SchedulerOutput:
        """commit -> schedule -> issue -> (fake) execute -> update, like InstanceEngine.step."""
        assert self.scheduler is not None
        sched = self.scheduler
        if self.migrations is not None:
            self.migrations.commit({r.request_id: r for r in sched.running})
        out = sched.schedule()
        for request in out.scheduled:
            if request.num_computed_tokens == 0:
                self.new_epoch(request.request_id)
        if self.migrations is not None:
            self.migrations.issue({r.request_id: r for r in sched.running})
        for work in out.batch:
            self.write(work.request_id, work.start_pos, work.end_pos)
        results = [SampleResult(w.request_id, token) for w in out.batch if w.sample]
        sched.update(out, results, now=self.cluster.now)
        for request in list(sched.requests.values()):
            if request.is_finished:
                if self.migrations is not None:
                    self.migrations.forget(request.request_id)
                sched.pop_finished(request.request_id)
        return out

    # ------------------------------------------------------------------ heartbeat
    def heartbeat(self, running: Optional[dict[str, Request]] = None) -> m.Heartbeat:
        """Counts, load and the placement changes since the last heartbeat."""
        if running is None:
            running = {r.request_id: r for r in self.scheduler.running} if self.scheduler else {}
        computed = {rid: r.num_computed_tokens for rid, r in running.items()}
        current = {
            rid: self.kv.placement_of(rid, n) for rid, n in computed.items() if self.kv.block_table(rid)
        }
        changed = [p for rid, p in current.items() if self._reported.get(rid) != p]
        removed = [rid for rid in self._reported if rid not in current]
        self._reported = current
        load = self.scheduler.load() if self.scheduler else m.InstanceLoad(batch_size=len(current))
        return m.Heartbeat(
            instance=self.id, seq=next(self.heartbeat_seq), sent_time=self.cluster.now,
            num_blocks=self.rm.pool.num_blocks, num_free=self.rm.num_free, num_lent=self.rm.num_lent,
            num_borrowed=self.rm.num_borrowed, lendable=self.rm.lendable, load=load,
            placements=changed, removed=removed,
        )


class Cluster:
    def __init__(self, num_instances: int, num_blocks: int | list[int] = 8, block_size: int = 4,
                 placement: str = "infinite", lend_fraction: float = 1.0, seed: int = 0,
                 scheduler: Optional[SchedulerConfig] = None,
                 migration_tokens_per_step: Optional[int] = None, max_context: Optional[int] = None,
                 headroom_fraction: float = 0.0) -> None:
        self.num_instances = num_instances
        self.block_size = block_size
        self.placement = placement
        self.now = 0.0
        self.rng = random.Random(seed)
        self.net = Network(self.rng)
        self.gm = GManager(num_instances)
        self.net.register(GM, self._gm_handle)
        sizes = num_blocks if isinstance(num_blocks, list) else [num_blocks] * num_instances
        self.nodes: list[Node] = []
        for i in range(num_instances):
            self.nodes.append(Node(self, i, sizes[i], lend_cap_for(placement, sizes[i], lend_fraction),
                                   headroom_fraction))
        for node in self.nodes:
            if scheduler is not None:
                cap = node.kv.max_tokens_per_request(sizes[node.id], node.rm.lend_cap)
                node.scheduler = Scheduler(scheduler, node.kv, max_context or cap)
            if migration_tokens_per_step is not None:
                node.migrations = HomeMigrations(node.kv, migration_tokens_per_step, node)
        self.beat()

    def _gm_handle(self, src: Any, msg: Any) -> None:
        assert isinstance(msg, m.Heartbeat)
        self.gm.heartbeat(msg, self.now)

    # ------------------------------------------------------------------ helpers
    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    @property
    def rms(self) -> list[RManager]:
        return [n.rm for n in self.nodes]

    @property
    def kvs(self) -> list[HomeKV]:
        return [n.kv for n in self.nodes]

    def beat(self, via_network: bool = False, running: Optional[dict[int, dict[str, Request]]] = None) -> None:
        """Every node sends a heartbeat (delivered now, or queued on the network)."""
        for node in self.nodes:
            beat = node.heartbeat(None if running is None else running.get(node.id, {}))
            if via_network:
                self.net.send(node.id, GM, beat)
            else:
                self.gm.heartbeat(beat, self.now)

    def deliver(self, n: int, keep: Optional[Callable[[Any, Any, Any], bool]] = None) -> int:
        return self.net.deliver(n, keep)

    def drain(self, keep: Optional[Callable[[Any, Any, Any], bool]] = None) -> int:
        return self.net.drain(keep)

    def check(self, drain: bool = True) -> None:
        """Quiesce the network, then check the cluster invariants."""
        if drain:
            self.drain()
        check_cluster(self.rms, self.kvs)

    def check_data(self, computed: dict[str, int]) -> None:
        """Every computed block of every listed request holds its own current KV (a committed
        copy carries the right content; no stale write landed in a live block)."""
        bs = self.block_size
        for node in self.nodes:
            for request_id in node.kv.requests():
                if request_id not in computed:
                    continue
                table = node.kv.block_table(request_id)
                epoch = node.epochs.get(request_id, 0)
                for index in range(min(len(table), math.ceil(computed[request_id] / bs))):
                    ref = table[index]
                    got = self.nodes[ref.instance].data.get(ref.block)
                    assert got == (request_id, epoch, index), (
                        f"{request_id!r} position {index} at {ref} holds {got}, expected {(request_id, epoch, index)}"
                    )

    def used_blocks(self) -> list[int]:
        return [n.rm.pool.num_used for n in self.nodes]

    def table(self, home: int, request_id: str) -> list[BlockRef]:
        return list(self.nodes[home].kv.block_table(request_id))


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4, t: float = 0.0,
                 max_total_tokens: int = 10**9) -> Request:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, list(range(1, prompt_len + 1)), params, t, max_total_tokens)
