"""InstanceEngine: one instance as an engine of its own.

Three threads, none of which waits for another instance's loop:
- the step loop: `step()` = apply inbound requests / commit migrations / schedule / execute /
  update, over the requests homed here, with this instance's own scheduler and token budget;
- the message pump: answers peers at once (attention over lent blocks, borrow/grant/release,
  block copies), hands replies to a waiting step, queues requests and migration orders for the
  loop. A home waiting for partials or a grant never blocks a peer's pump, so borrowing both ways
  cannot deadlock and a slow instance delays only the requests whose blocks it holds;
- the heartbeat thread: on a period, sends the gManager this instance's block counts, load and
  changed placements, whatever the compute is doing.
The rManager is shared by the loop and the pump; every access holds `self.lock`.

Failures: an exception that escapes a step is fatal (fail-stop): the instance tells the gManager
and stops, and its requests are recomputed elsewhere. When the gManager announces a peer dead,
the pump drops that peer's messages from then on and ends any wait on it; at the next step
boundary the loop frees what was lent to it and recomputes, here, every request that had KV on
it. An announcement of this instance's own death (it was wedged and resumed) stops it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from infinite_llm.config import EngineConfig, ModelConfig
from infinite_llm.control import creditor
from infinite_llm.control import messages as m
from infinite_llm.control.home_kv import HomeKV, lend_cap_for
from infinite_llm.control.migration import HomeMigrations
from infinite_llm.control.pacer import PrefillPacer
from infinite_llm.control.plan import BlockRef, SampleResult
from infinite_llm.control.request import FinishReason, Request
from infinite_llm.control.rmanager import RManager
from infinite_llm.control.scheduler import Scheduler, SchedulerOutput
from infinite_llm.instance.attention import GuestAttention, PartialMailbox, PeerLost, StepInterrupted
from infinite_llm.instance.kv_cache import PagedKVCache
from infinite_llm.instance.runner import ModelRunner
from infinite_llm.transport.base import Endpoint, TransportClosed

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """A request/response exchange the loop waits on (borrow, creditor query)."""

    done: threading.Event
    dst: object = None
    reply: Any = None


class InstanceEngine:
    def __init__(self, rank: int, config: EngineConfig, model_config: ModelConfig, model: torch.nn.Module,
                 endpoint: Endpoint, device: str = "cpu", members: Optional[list[int]] = None,
                 host: str = "") -> None:
        cache_cfg, cluster = config.cache, config.cluster
        self.rank = rank
        self.host = host
        self.config = config
        self.endpoint = endpoint
        self.device = torch.device(device)
        self.lock = threading.RLock()
        blocks = cache_cfg.num_blocks_per_instance
        self.lend_cap = lend_cap_for(cluster.placement, blocks, cache_cfg.lend_fraction)
        self.rm = RManager(rank, blocks, self.lend_cap)
        # Instances ever in the cluster (ids are never reused); `dead` holds those gone since.
        self.members: set[int] = set(members if members is not None else range(cluster.num_instances))
        self.dead: set[int] = set()
        self.kv = HomeKV(self.rm, cache_cfg.block_size, cluster.placement, cluster.num_instances, self, self.lock,
                         config.scheduler.headroom_fraction)
        self.kv.set_members(sorted(self.members))
        self.max_position = model_config.max_position_embeddings
        self.scheduler = Scheduler(config.scheduler, self.kv, self._capacity())
        self.migrations = HomeMigrations(self.kv, cluster.migration_tokens_per_step, self)
        sched = config.scheduler
        self.pacer = PrefillPacer(sched.max_num_batched_tokens, sched.prefill_slowdown, sched.lone_prefill_slowdown)
        dtype = next(model.parameters()).dtype
        self.cache = PagedKVCache(model_config, cache_cfg, dtype, self.device)
        self.mailbox = PartialMailbox(on_wait=self._tick)
        # In process, a split step's per-layer exchange runs on the home's step thread: the
        # query is served by this holder's GuestAttention and the reply put into the home's
        # mailbox without waking either pump. Two wake-ups per layer, and the GIL handed back and
        # forth between the step thread and a pump, cost more than the holder's MicroAttention
        # (a 1K split decode: 375 us per layer against 134 us all local). Across processes, and
        # behind an earlier queued message of the same pair, they come through the pump.
        endpoint.handle_inline(m.AttnPartial, self._on_partial)
        endpoint.handle_inline(m.AttnQuery, self._on_attn_query_inline)
        self.runner = ModelRunner(rank, model, model_config, self.cache, self.device, endpoint.send,
                                  self.mailbox, seed=config.seed, attention_timeout_s=cluster.attention_timeout_s)
        self.guests = GuestAttention(rank, self.rm, self.lock, self.cache, self.device)
        self.step_delay_s = (cluster.debug_step_delay_s or {}).get(rank, 0.0)  # test hook: a slow instance
        self._inbound: deque[object] = deque()
        # New requests received (the pump counts first, then queues) and taken in by the loop: a
        # difference is a request waiting for its first step.
        self._num_arrived = 0
        self._num_taken_in = 0
        self.num_called_off = 0  # steps of prompts alone called off for a newcomer
        self._wake = threading.Event()
        self._calls: dict[int, _Call] = {}
        self._tags = itertools.count()
        self._stop = threading.Event()
        self._closed = False  # the endpoint
        self._reported: dict[str, int] = {}  # request -> output tokens already reported
        self._placements: dict[str, m.RequestPlacement] = {}
        self._placement_delta: tuple[list[m.RequestPlacement], list[str]] = ([], [])
        self._load = m.InstanceLoad()
        self._last_snapshot = 0.0
        self._heartbeat_seq = itertools.count(1)
        self.num_steps = 0
        self.num_recomputed = 0
        self.fenced = False  # this instance was declared dead
        self._loop_tick = time.monotonic()
        self.failed: Optional[BaseException] = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for name, target in (("pump", self._pump), ("loop", self._loop), ("heartbeat", self._heartbeats)):
            thread = threading.Thread(target=target, name=f"instance-{self.rank}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every thread to exit and wait up to `timeout_s` for each (0: do not wait)."""
        self._stop.set()
        self._wake.set()
        self.mailbox.close()
        if not self._closed:
            self._closed = True
            self.endpoint.close()
        for thread in self._threads:
            if timeout_s and thread is not threading.current_thread():
                thread.join(timeout_s)

    # ------------------------------------------------------------------ step loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._tick()
            if not self._has_work():
                self._snapshot(force=True)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                progressed = self.step()
            except Exception as exc:  # noqa: BLE001 - fail-stop: the cluster recomputes our requests
                self._crash(exc)
                return
            if not progressed:  # nothing schedulable (waiting for memory): poll, do not spin
                self._wake.wait(0.01)
                self._wake.clear()

    def _tick(self) -> None:
        """The loop is going round (or waiting on a peer, which is not being wedged)."""
        self._loop_tick = time.monotonic()

    def _crash(self, exc: BaseException) -> None:
        logger.exception("instance %d: step failed; the instance stops", self.rank, exc_info=exc)
        self.failed = exc
        try:
            self.endpoint.send(m.GMANAGER, m.InstanceFailed(self.rank, f"step failed: {type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001 - the gManager also notices the silence
            pass
        self._stop.set()
        self._wake.set()

    def _has_work(self) -> bool:
        return bool(self._inbound or self.scheduler.has_unfinished() or self.migrations.busy())

    def step(self) -> bool:
        """schedule -> execute -> update. Returns whether a batch ran."""
        self._apply_inbound()
        running = {r.request_id: r for r in self.scheduler.running}
        self.migrations.commit(running)
        self.scheduler.pace_prefill(self.pacer)
        out = self.scheduler.schedule()
        for home, request_id in self.scheduler.take_reclaims():
            self.endpoint.send(home, m.ReclaimBlocks(self.rank, request_id))
        for request_id, on in self.scheduler.take_holds():
            for peer in sorted(self.members - self.dead - {self.rank}):
                self.endpoint.send(peer, m.AdmissionHold(self.rank, request_id, on))
        self.migrations.issue({r.request_id: r for r in self.scheduler.running})
        if out.preempted:
            self._report(out.preempted)
        if not out.batch:
            self._snapshot()
            return False
        results = self._execute(out)
        if results is None:  # called off, or a holder died mid-step (recovered at the next boundary): redo
            return True
        self._update(out, results)
        self._snapshot()
        return True

    def _execute(self, out: SchedulerOutput) -> Optional[list[SampleResult]]:
        self.num_steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        started = time.perf_counter()
        called_off = self._newcomer_calls_off(started) if out.num_decodes == 0 else None
        try:
            results = self.runner.execute(out.batch, self.num_steps, called_off)
        except StepInterrupted:  # nothing was committed: the prompt redoes the chunk beside the newcomer
            self.num_called_off += 1
            return None
        except PeerLost as lost:
            # Nothing was committed: the scheduler redoes these tokens (KV writes are idempotent)
            # once the requests with KV on the dead holder are put back to recompute.
            logger.warning("instance %d: step %d lost holder %d; redoing it", self.rank, self.num_steps, lost.instance)
            return None
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail; the instance goes on
            logger.exception("instance %d: step %d failed", self.rank, self.num_steps)
            error = f"{type(exc).__name__}: {exc}"
            return [SampleResult(w.request_id, -1, error=error) for w in out.batch]
        self.pacer.observe(time.perf_counter() - started, out.num_prefill_tokens, out.num_decodes)
        return results

    def _newcomer_calls_off(self, started: float) -> Callable[[float], bool]:
        """For a step of prompts alone: a request waiting to be taken in calls it off (the next
        time the step asks) if the rest of the step would keep it too long (PrefillPacer.interrupts)."""
        num_layers = self.runner.config.num_hidden_layers

        def called_off(layers_done: float) -> bool:
            return (self._num_arrived > self._num_taken_in
                    and self.pacer.interrupts(time.perf_counter() - started, layers_done / num_layers))

        return called_off

    def _update(self, out: SchedulerOutput, results: list[SampleResult]) -> None:
        now = time.monotonic()
        errors = {r.request_id: r.error for r in results if r.error is not None}
        failed = []
        for work in out.batch:  # a failed prefill chunk (nothing sampled) fails its request too
            if work.request_id in errors and not work.sample:
                self.scheduler.finish(work.request_id, FinishReason.ABORT, now)
                failed.append(self.scheduler.requests[work.request_id])
        self._report(failed + self.scheduler.update(out, results, now), errors)

    def _report(self, requests: list[Request], errors: Optional[dict[str, str]] = None) -> None:
        updates = []
        for request in requests:
            seen = self._reported.get(request.request_id, 0)
            new = request.output_token_ids[seen:]
            self._reported[request.request_id] = len(request.output_token_ids)
            updates.append(m.RequestUpdate(
                instance=self.rank, request_id=request.request_id, new_token_ids=list(new),
                finished=request.is_finished,
                finish_reason=request.finish_reason.value if request.finish_reason else None,
                num_preemptions=request.num_preemptions, first_token_time=request.first_token_time,
                finished_time=request.finished_time, error=(errors or {}).get(request.request_id),
            ))
            if request.is_finished:
                self._forget(request.request_id)
        if updates:
            self.endpoint.send(m.ROUTER, updates)

    def _forget(self, request_id: str) -> None:
        self._reported.pop(request_id, None)
        self.migrations.forget(request_id)
        self.scheduler.pop_finished(request_id)

    def _apply_inbound(self) -> None:
        while self._inbound:
            item = self._inbound.popleft()
            if isinstance(item, m.AddRequest):
                self._num_taken_in += 1
                self._admit(item.request, item.resumed)
            elif isinstance(item, m.AbortRequest):
                request = self.scheduler.abort(item.request_id)
                if request is not None:
                    request.finished_time = time.monotonic()
                    self._report([request])
            elif isinstance(item, m.MigrationOrder):
                self.migrations.add_order(item)
            elif isinstance(item, m.InstanceDown):
                self._recover_from(item.instance)
            elif isinstance(item, m.ReclaimBlocks):
                request = self.scheduler.reclaim(item.request_id)
                if request is not None:  # recomputed later, when memory allows
                    self.migrations.forget(item.request_id)
                    self._report([request])
            elif isinstance(item, m.AdmissionHold):
                self.scheduler.set_peer_hold(item.home, item.request_id, item.on)
            elif isinstance(item, m.InstanceJoined):
                self.members.add(item.instance)
                self._membership_changed(f"instance {item.instance} joined")
                for request_id in sorted(self.scheduler.starving):  # it lends too: it holds as well
                    self.endpoint.send(item.instance, m.AdmissionHold(self.rank, request_id, True))

    def _recover_from(self, dead: int) -> None:
        """Free what was lent to the dead instance and recompute, here, the requests that had KV
        (or a migration target) on it; fail those the live instances can no longer hold."""
        with self.lock:
            for request_id in list(self.rm.lent_ledger.get(dead, {})):
                self.rm.release_lent(dead, request_id)
            touching = {rid for rid, creditors in self.rm.borrowed_ledger.items() if dead in creditors}
        self.migrations.fail_copies_touching(dead)
        self.scheduler.drop_peer_holds(dead)
        lost = [r for r in self.scheduler.running if r.request_id in touching]
        for request in lost:
            self.migrations.forget(request.request_id)
            self.scheduler.recompute(request)
        self.num_recomputed += len(lost)
        if lost:
            logger.warning("instance %d: recomputing %d request(s) that had KV on dead instance %d",
                           self.rank, len(lost), dead)
        self._membership_changed(f"instance {dead} died")

    def _capacity(self) -> int:
        return min(self.kv.max_tokens_per_request(self.rm.pool.num_blocks, self.lend_cap), self.max_position)

    def _membership_changed(self, why: str) -> None:
        """Re-stripe over the live members and re-cap the context; fail what no longer fits."""
        live = sorted(self.members - self.dead)
        self.kv.set_members(live)
        capacity = self._capacity()
        too_long = self.scheduler.set_max_context(capacity, time.monotonic())
        if too_long:
            self._report(too_long, {
                r.request_id: f"{why} and the {len(live)} live instance(s) hold at most {capacity} tokens per "
                              f"request; this request needs {r.num_prompt_tokens + (r.sampling.max_tokens or 1)}"
                for r in too_long
            })

    def _admit(self, request: Request, resumed: bool = False) -> None:
        try:
            self.scheduler.add_request(request, enforce_queue_limit=not resumed)
        except Exception as exc:  # noqa: BLE001 - the router validated; this request fails alone
            request.finish_reason = FinishReason.ABORT
            self.endpoint.send(m.ROUTER, [m.RequestUpdate(self.rank, request.request_id, [], True, "abort",
                                                          error=f"{type(exc).__name__}: {exc}")])
            return
        self._reported[request.request_id] = len(request.output_token_ids)

    # ------------------------------------------------------------------ message pump
    def _pump(self) -> None:
        handlers = {
            m.AttnQuery: self._on_attn_query, m.AttnPartial: self._on_partial,
            m.BorrowRequest: self._on_borrow, m.BorrowReply: self._on_reply, m.CreditorReply: self._on_reply,
            m.ReleaseBlocks: self._on_release, m.AttachBlock: self._on_attach,
            m.CopyBlock: self._on_copy_block, m.BlockData: self._on_block_data,
            m.CopyDone: lambda msg: self.migrations.copy_done(msg.tag, msg.ok),
        }
        while not self._stop.is_set():
            try:
                message = self.endpoint.recv(timeout=0.5)
            except TransportClosed:
                return
            if message is None or m.sender_of(message) in self.dead:
                continue  # a dead instance's late messages are fenced off
            if isinstance(message, m.InstanceDown):
                self._on_instance_down(message)
                continue
            if isinstance(message, (m.AddRequest, m.AbortRequest, m.MigrationOrder, m.InstanceJoined, m.ReclaimBlocks,
                                    m.AdmissionHold)):
                if isinstance(message, m.AddRequest):
                    self._num_arrived += 1
                self._inbound.append(message)
                self._wake.set()
                continue
            if isinstance(message, m.Stop):
                self._stop.set()
                self._wake.set()
                return
            try:
                handlers[type(message)](message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the pump
                logger.exception("instance %d: handling %s failed", self.rank, type(message).__name__)

    def _on_instance_down(self, down: m.InstanceDown) -> None:
        """Pump side: fence the dead peer and end every wait on it now; the loop recovers."""
        if down.instance == self.rank:
            logger.error("instance %d: declared dead by the gManager (%s); stopping", self.rank, down.reason)
            self.fenced = True
            self._stop.set()
            self._wake.set()
            self.mailbox.close()  # a step waiting on peers that now ignore us ends at once
            return
        if down.instance in self.dead:
            return
        self.dead.add(down.instance)
        self.mailbox.lose(down.instance)
        for tag, call in list(self._calls.items()):
            if call.dst == down.instance:
                self._calls.pop(tag, None)
                call.done.set()  # reply None: refused
        self._inbound.append(down)
        self._wake.set()

    def _on_partial(self, partial: m.AttnPartial) -> bool:
        if partial.holder not in self.dead:
            self.mailbox.put(partial)
        return True

    def _on_attn_query(self, query: m.AttnQuery) -> None:
        self.endpoint.send(query.home, self.guests.serve(query))

    def _on_attn_query_inline(self, query: m.AttnQuery) -> bool:
        """Serve a small query on its home's thread. Declined, so queued for the pump: a large
        one (the pump serves it in parallel with the home), any while this instance is stopped
        (its closed inbox answers nothing), one from a peer it holds dead (the pump drops it)."""
        if self._stop.is_set() or query.home in self.dead or not self.guests.serves_inline(query):
            return False
        try:
            self._on_attn_query(query)
        except Exception:  # noqa: BLE001 - never into the home's step; the home times out
            logger.exception("instance %d: serving %d's query failed", self.rank, query.home)
        return True

    def _on_borrow(self, req: m.BorrowRequest) -> None:
        with self.lock:
            reply = creditor.on_borrow(self.rm, req)
        self.endpoint.send(req.borrower, reply)

    def _on_reply(self, reply: Any) -> None:
        call = self._calls.pop(reply.tag, None)
        if call is None:  # the caller gave up waiting: give back a late grant
            if isinstance(reply, m.BorrowReply) and reply.blocks:
                self.endpoint.send(reply.creditor, m.ReleaseBlocks(self.rank, reply.request_id, reply.blocks))
            return
        call.reply = reply
        call.done.set()

    def _on_release(self, msg: m.ReleaseBlocks) -> None:
        with self.lock:
            creditor.on_release(self.rm, msg)

    def _on_attach(self, msg: m.AttachBlock) -> None:
        with self.lock:
            creditor.on_attach(self.rm, msg)

    @torch.inference_mode()
    def _on_copy_block(self, msg: m.CopyBlock) -> None:
        with self.lock:
            payload = self.cache.block_payload(msg.src_block) if self.rm.holds(msg.request_id, msg.src_block) else None
        if payload is None:
            self.endpoint.send(msg.home, m.CopyDone(msg.tag, self.rank, msg.request_id, ok=False))
            return
        self.endpoint.send(msg.dst, m.BlockData(msg.tag, self.rank, msg.home, msg.request_id, msg.dst_block, payload))

    @torch.inference_mode()
    def _on_block_data(self, msg: m.BlockData) -> None:
        with self.lock:  # only the copy the block was reserved for may write it
            ok = self.rm.accepts_copy(msg.request_id, msg.dst_block, msg.tag)
            if ok:
                self.cache.load_block(msg.dst_block, msg.payload.to(self.device))
        self.endpoint.send(msg.home, m.CopyDone(msg.tag, self.rank, msg.request_id, ok))

    # ------------------------------------------------------------------ PeerLink / CopyLink
    def _call(self, dst: object, make: Any, timeout_s: float = 10.0) -> Any:
        """Send a request and wait for its reply (None: no reply in time, or `dst` died)."""
        if dst in self.dead:
            return None
        tag = next(self._tags)
        call = _Call(threading.Event(), dst)
        self._calls[tag] = call
        self.endpoint.send(dst, make(tag))
        deadline = time.monotonic() + timeout_s
        while not call.done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            self._tick()  # waiting on a peer is not a wedged loop
            if time.monotonic() >= deadline or self._stop.is_set():
                self._calls.pop(tag, None)
                return None
        return call.reply

    def creditors(self, num_blocks: int) -> list[tuple[int, int]]:
        reply = self._call(m.GMANAGER, lambda tag: m.CreditorQuery(tag, self.rank, num_blocks))
        return list(reply.candidates) if reply is not None else []

    def borrow(self, creditor: int, request_id: str, num_blocks: int, indices: Optional[list[int]],
               copy_tags: Optional[list[int]] = None, yields: bool = False) -> Optional[list[int]]:
        reply = self._call(creditor, lambda tag: m.BorrowRequest(tag, self.rank, request_id, num_blocks,
                                                                 indices, copy_tags, yields))
        return reply.blocks if reply is not None else None

    def release(self, creditor: int, request_id: str, blocks: Optional[list[int]]) -> None:
        if creditor not in self.dead:  # a dead creditor's pool is gone with it
            self.endpoint.send(creditor, m.ReleaseBlocks(self.rank, request_id, blocks))

    def attach(self, holder: int, request_id: str, index: int, block: int) -> None:
        if holder not in self.dead:
            self.endpoint.send(holder, m.AttachBlock(self.rank, request_id, index, block))

    def start_copy(self, tag: int, request_id: str, src: BlockRef, dst: BlockRef) -> None:
        if src.instance in self.dead or dst.instance in self.dead:
            self.migrations.copy_done(tag, False)
            return
        self.endpoint.send(src.instance, m.CopyBlock(tag, self.rank, request_id, src.block, dst.instance, dst.block))

    # ------------------------------------------------------------------ heartbeats
    def _snapshot(self, force: bool = False) -> None:
        """Refresh the load and placement changes the heartbeat thread sends (loop thread)."""
        now = time.monotonic()
        if not force and now - self._last_snapshot < self.config.cluster.heartbeat_interval_s / 2:
            return
        self._last_snapshot = now
        current = {
            r.request_id: self.kv.placement_of(r.request_id, r.num_computed_tokens)
            for r in self.scheduler.running if self.kv.block_table(r.request_id)
        }
        changed = [p for rid, p in current.items() if self._placements.get(rid) != p]
        removed = [rid for rid in self._placements if rid not in current]
        self._placements = current
        load = self.scheduler.load()
        load.num_steps = self.num_steps
        load.num_preemptions = self.scheduler.num_preemptions
        load.num_migrated_blocks = self.migrations.num_migrated_blocks
        load.num_guest_queries = self.guests.num_served
        load.num_recomputed = self.num_recomputed
        with self.lock:
            old_changed, old_removed = self._placement_delta
            keep = {p.request_id: p for p in old_changed if p.request_id not in removed}
            keep.update({p.request_id: p for p in changed})
            self._placement_delta = (list(keep.values()), [r for r in old_removed if r not in current] + removed)
            self._load = load

    def heartbeat(self) -> m.Heartbeat:
        with self.lock:
            changed, removed = self._placement_delta
            self._placement_delta = ([], [])
            return m.Heartbeat(
                instance=self.rank, seq=next(self._heartbeat_seq), sent_time=time.monotonic(),
                num_blocks=self.rm.pool.num_blocks, num_free=self.rm.num_free, num_lent=self.rm.num_lent,
                num_borrowed=self.rm.num_borrowed, lendable=self.rm.lendable, load=self._load,
                placements=changed, removed=removed, loop_age_s=time.monotonic() - self._loop_tick, host=self.host,
            )

    def _heartbeats(self) -> None:
        period = self.config.cluster.heartbeat_interval_s
        while True:
            try:
                self.endpoint.send(m.GMANAGER, self.heartbeat())
            except TransportClosed:
                return
            except Exception:  # noqa: BLE001 - keep beating; the gManager judges liveness
                logger.exception("instance %d: heartbeat failed", self.rank)
            if self._stop.wait(period):
                return
