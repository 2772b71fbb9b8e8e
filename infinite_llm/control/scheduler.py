"""Admission, continuous batching, chunked prefill and preemption (pure Python).

Every step the scheduler spends a token budget (`max_num_batched_tokens`):
1. Running requests first, oldest first: one token each when decoding, or the next prompt chunk
   when a prefill is unfinished. A prefill chunk never takes the tokens that the decoding requests
   behind it need (one each), so a long prompt cannot stall other requests' decoding
   (head-of-line blocking); `long_prefill_token_threshold` caps a chunk further, and so does
   `prefill_chunk_cap` (set from measured step times by the instance's `PrefillPacer`; a quarter
   of the budget while others decode or wait, until it knows better), so that a long prompt
   neither freezes everyone's first token nor stretches their inter-token gaps. If the
   KV manager cannot grow a request's block table, the newest running request is preempted (its
   blocks freed, its KV recomputed later) until the older one fits. Older requests therefore
   always make progress: no livelock.
2. Then waiting requests in FIFO order, each given the KV blocks of its whole prompt and a first
   prefill chunk, until the budget, `max_num_seqs` or the KV memory runs out. A step that admits
   newcomers leaves out the chunks of prompts already running (not two steps in a row), so a
   newcomer's first token waits for its own prefill, not for a slice of someone's long prompt.
3. A prompt chunk of a request larger than one instance leaves a step that carries requests
   fitting one instance, except once every `spanning_prefill_every` such steps: it waits for its
   holders at every layer, and whoever shares its step waits as long.

Each instance has its own scheduler over the requests homed on it (the router picked the home):
its own budget, batch and preemption; nothing is shared with other instances' schedulers. The
result is the instance's batch (`SeqWork`s). The scheduler never touches tensors; the same code
drives the real instances and the cluster simulator.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from infinite_llm.config import SchedulerConfig
from infinite_llm.control.home_kv import HomeKV
from infinite_llm.control.messages import InstanceLoad
from infinite_llm.control.pacer import PrefillPacer
from infinite_llm.control.plan import SampleResult, SeqWork
from infinite_llm.control.request import FinishReason, Request, RequestStatus


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; the client should retry later (HTTP 429)."""


class RequestTooLongError(ValueError):
    """The request can never fit the KV memory its policy allows (HTTP 400)."""


@dataclass
class SchedulerOutput:
    batch: list[SeqWork] = field(default_factory=list)
    num_decodes: int = 0  # requests in the batch that decode one token
    num_prefill_tokens: int = 0  # tokens of prompt (or recompute) chunks
    scheduled: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: HomeKV, max_context: int) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "spanning_prefill_every"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        threshold = config.long_prefill_token_threshold
        if threshold is not None and threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be >= 1 or None, got {threshold}")
        self.config = config
        self.kv = kv
        self._max_context = max_context
        self.block_size = kv.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._step_id = 0
        # The head of the waiting queue did not fit when admission was last tried (kept while a
        # full token budget stops admission from being tried, so the heartbeat keeps reporting it).
        self._blocked_on_memory = False
        # Cap on the chunks of prompts already running (None: budget // 4 while others decode or
        # wait; 0: none this step). Newly admitted prompts are not held back by it.
        self.prefill_chunk_cap: Optional[int] = None
        self.num_preemptions = 0  # cumulative, over all requests ever seen
        self.num_received = 0  # add_request calls, ever
        # (borrower, request) pairs to ask for lent blocks back; the engine sends them.
        self.reclaims: list[tuple[int, str]] = []
        self._reclaiming: set[str] = set()
        self._held_back_last_step = False  # see _hold_back_older_chunks
        self._spanning_chunks_deferred = 0  # steps in a row that left them out (see _defer_spanning_chunks)
        # Requests larger than one instance: how many requests were admitted past each while it
        # waited; past STARVATION_PASSES it starves, and then stops yielding (see _starve).
        self._passes: dict[str, int] = {}
        self.starving: set[str] = set()  # waiting, no longer passed; peers hold their admissions
        self._unyielding: set[str] = set()  # admitted after starving: never reclaimed
        self.peer_holds: set[tuple[int, str]] = set()  # (home, request) starving elsewhere
        self.holds: list[tuple[str, bool]] = []  # (request, on) to announce to every peer

    # ----------------------------------------------------------------- admission
    def max_context(self) -> int:
        """The longest context (prompt + output) one request can ever hold."""
        return self._max_context

    def add_request(self, request: Request, enforce_queue_limit: bool = True) -> None:
        """Queue a request (QueueFullError past `max_waiting`, unless told not to: a request
        recomputed after its home died was admitted once already)."""
        self.num_received += 1  # the router's pending count of this instance ends here, taken or not
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: at least one token is required")
        capacity = self.max_context()
        request.max_total_tokens = min(request.max_total_tokens, capacity)
        wanted = request.num_prompt_tokens + (request.sampling.max_tokens or 1)
        if wanted > capacity:
            raise RequestTooLongError(
                f"prompt ({request.num_prompt_tokens} tokens) plus max_tokens "
                f"({request.sampling.max_tokens}) exceeds the {capacity} tokens of KV cache one "
                f"request can use under the '{self.kv.placement}' placement policy"
            )
        if enforce_queue_limit and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting} requests); retry later"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> Optional[Request]:
        """Finish a request now and release all its blocks, local and remote. Idempotent."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        self._finish(request, FinishReason.ABORT)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def load(self) -> InstanceLoad:
        """The heartbeat's load figures. Requests waiting while the pool is full (or that were
        preempted) wait for memory."""
        memory_short = bool(self.waiting) and (self._blocked_on_memory or any(r.num_preemptions for r in self.waiting))
        return InstanceLoad(
            batch_size=len(self.running),
            num_waiting=len(self.waiting),
            num_waiting_for_memory=len(self.waiting) if memory_short else 0,
            waiting_tokens=sum(r.num_tokens for r in self.waiting),
            running_tokens=sum(r.num_tokens for r in self.running),
            prefill_backlog_tokens=sum(max(0, r.num_tokens - r.num_computed_tokens - 1)
                                       for r in itertools.chain(self.running, self.waiting)),
            num_received=self.num_received,
        )

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---------------------------------------------------------------- scheduling
    def pace_prefill(self, pacer: PrefillPacer) -> None:
        """Take the next step's cap on running prompts' chunks from the instance's pacer."""
        has_decodes = any(self._is_decoding(r) for r in self.running)
        # Other instances' requests wait on this one's steps: it holds their KV, or a prompt's
        # chunk runs attention on its holders. (A running prompt larger than this instance is
        # split: admission took the KV of its whole prompt.)
        shared = self.kv.rm.num_lent > 0 or any(self.kv.is_split(r.request_id)
                                                for r in self.running if not self._is_decoding(r))
        self.prefill_chunk_cap = pacer.next_cap(has_decodes, has_decodes or self.admission_possible(), shared)

    def admission_possible(self) -> bool:
        """Requests wait that could be admitted: waiters blocked on memory do not count, since
        holding a running prompt back for them would only stall it (they wait for its blocks)."""
        return bool(self.waiting) and not self._blocked_on_memory

    @staticmethod
    def _is_decoding(request: Request) -> bool:
        """Only the newest token is left to compute (a recomputing request after preemption is
        still prefilling its prompt and earlier output)."""
        return request.num_tokens - request.num_computed_tokens == 1

    def _preempt(self, victim: Request) -> None:
        """Preemption by recompute: drop the KV, requeue at the front of the waiting queue."""
        self.recompute(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1

    def recompute(self, request: Request) -> None:
        """Drop a running request's KV and requeue it first: its prompt and the tokens generated
        so far are computed again (after preemption, or when a holder of its KV died)."""
        self.kv.free(request.request_id)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        if request.request_id in self._unyielding:  # it starved once: it does not wait again
            self._unyielding.discard(request.request_id)
            self._starve(request.request_id)

    def set_max_context(self, tokens: int, now: float) -> list[Request]:
        """The cluster's membership changed: the context cap is now `tokens`. Finishes (aborts)
        the requests that could no longer complete and returns them."""
        self._max_context = tokens
        too_long = [
            r for r in [*self.running, *self.waiting]
            if r.num_prompt_tokens + (r.sampling.max_tokens or 1) > self._max_context
        ]
        for request in too_long:
            self._finish(request, FinishReason.ABORT, now)
        return too_long

    def schedule(self) -> SchedulerOutput:
        self._step_id += 1
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        # 1. running requests, oldest first. `decodes_behind` counts the decoding requests after
        #    the current one: a prefill chunk leaves one token of budget for each of them.
        decodes_behind = sum(1 for r in self.running if self._is_decoding(r))
        chunk_cap = self.config.long_prefill_token_threshold or budget
        # A running prompt's chunk shrinks while others decode or wait for admission.
        running_cap = chunk_cap
        if decodes_behind or self.admission_possible():
            running_cap = min(chunk_cap, max(1, budget // 4))
        if self.prefill_chunk_cap is not None:
            running_cap = min(running_cap, self.prefill_chunk_cap)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            if self._is_decoding(request):
                decodes_behind -= 1
                num_new = min(remaining, budget)
            else:
                num_new = min(remaining, running_cap, max(1, budget - decodes_behind))
            if num_new <= 0:  # nothing to do (should not happen for a running request)
                index += 1
                continue
            target = request.num_computed_tokens + num_new
            while not self.kv.allocate(request.request_id, target, request.request_id not in self._unyielding):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                index += 1
                continue
            break  # the request preempted itself: nothing newer is left to run

        # 2. waiting requests (no admission while anything was preempted this step: memory is
        #    short, and the preempted request is first in line anyway).
        if not preempted:
            num_running = len(scheduled)
            self._admit_waiting(budget, chunk_cap, scheduled)
            self._hold_back_older_chunks(scheduled, num_running)
        self._defer_spanning_chunks(scheduled)
        return self._output(scheduled, preempted)

    def _output(self, scheduled: list[tuple[Request, int]], preempted: list[Request]) -> SchedulerOutput:
        """The step's batch: each scheduled request's next `num_new` tokens and block table."""
        out = SchedulerOutput(scheduled=[r for r, _ in scheduled], preempted=preempted)
        for request, num_new in scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            if self._is_decoding(request):
                out.num_decodes += 1
            else:
                out.num_prefill_tokens += num_new
            out.batch.append(
                SeqWork(
                    request_id=request.request_id,
                    token_ids=request.token_slice(start, end),
                    start_pos=start,
                    block_table=list(self.kv.block_table(request.request_id)),
                    sample=end == request.num_tokens,
                    sampling=request.sampling,
                    num_generated=len(request.output_token_ids),
                )
            )
        return out

    def _hold_back_older_chunks(self, scheduled: list[tuple[Request, int]], num_running: int) -> None:
        """A step that admits new requests carries no chunk of a prompt already running: the
        newcomers' first token then waits for their own prefill only. Never two steps in a row,
        so a stream of arrivals slows a running prompt at most twofold."""
        admitted = len(scheduled) > num_running
        older = [i for i in range(num_running) if not self._is_decoding(scheduled[i][0])]
        if admitted and older and not self._held_back_last_step:
            for i in reversed(older):
                del scheduled[i]
            self._held_back_last_step = True
        else:
            self._held_back_last_step = False

    def _defer_spanning_chunks(self, scheduled: list[tuple[Request, int]]) -> None:
        """Prompt chunks of requests larger than one instance leave a step that carries requests
        fitting one instance, except every `spanning_prefill_every`-th such step: such a chunk
        waits for its holders at every layer (they compute most of its attention), and the
        requests sharing its step would wait with it."""
        spans = [self._spans_instances(r) for r, _ in scheduled]
        spanning = [i for i, (r, _) in enumerate(scheduled) if spans[i] and not self._is_decoding(r)]
        if not spanning:
            return
        if all(spans) or self._spanning_chunks_deferred + 1 >= self.config.spanning_prefill_every:
            self._spanning_chunks_deferred = 0
            return
        self._spanning_chunks_deferred += 1
        for i in reversed(spanning):
            del scheduled[i]

    # How far down the waiting queue admission looks past requests larger than an instance.
    ADMISSION_LOOKAHEAD = 64

    def _admit_waiting(self, budget: int, chunk_cap: int, scheduled: list[tuple[Request, int]]) -> None:
        """Admit waiting requests first come, first served, while budget and seats last.

        Admission takes the KV of the whole prompt, not just its first chunk: prompts admitted
        chunk by chunk would run out of memory halfway and preempt each other, losing their
        computed chunks. A head that cannot get its memory stops admission, except a request
        larger than this whole instance (it waits for the cluster to lend): requests behind it
        that fit the home's free blocks go ahead, so a long request never holds short ones up,
        until STARVATION_PASSES went past it (see _starve). While a peer's request starves,
        nothing new is admitted here. No policy that rejects such requests (static) ever skips.
        """
        self._blocked_on_memory = False
        index = 0
        while (index < min(len(self.waiting), self.ADMISSION_LOOKAHEAD) and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[index]
            starving = request.request_id in self.starving
            if self.peer_holds and not starving:
                break  # a peer's long request starves: its holders admit nothing new
            passing = index > 0  # going past a head larger than an instance
            if passing and not self.kv.fits_at_home(request.request_id, request.num_tokens):
                index += 1
                continue
            if not self.kv.allocate(request.request_id, request.num_tokens, not starving):
                self._blocked_on_memory |= not passing
                if passing or starving or not self._spans_instances(request):
                    break
                index += 1
                continue
            del self.waiting[index]
            passed = [r for r in itertools.islice(self.waiting, index) if self._spans_instances(r)]
            self._admitted(request, passed)
            num_new = min(request.num_tokens - request.num_computed_tokens, chunk_cap, budget)
            scheduled.append((request, num_new))
            budget -= num_new
        # The first waiting request that fits one instance waits for memory this instance could
        # give it: lend none away meanwhile, and take back what requests larger than an
        # instance hold here if that lets it start.
        if self.kv.placement != "infinite":
            return  # striped lends by design, static never
        if self.peer_holds:  # a starving peer request needs what this instance can lend
            self.kv.pause_lending(False)
            return
        first = next((r for r in itertools.islice(self.waiting, self.ADMISSION_LOOKAHEAD)
                      if not self._spans_instances(r)), None)
        self.kv.pause_lending(first is not None)
        if first is not None:
            self._plan_reclaims(first)

    # Admissions past a waiting request larger than one instance before it starves.
    STARVATION_PASSES = 128

    def _admitted(self, request: Request, passed: list[Request]) -> None:
        """`request` runs now, admitted past `passed` (requests larger than one instance)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._passes.pop(request.request_id, None)
        if self._end_starving(request.request_id):
            self._unyielding.add(request.request_id)
        for waiting in passed:
            self._passes[waiting.request_id] = self._passes.get(waiting.request_id, 0) + 1
            if self._passes[waiting.request_id] >= self.STARVATION_PASSES:
                self._starve(waiting.request_id)

    def _starve(self, request_id: str) -> None:
        """The request has waited while many were admitted past it: no more are, it is admitted
        without the holders' headroom and not reclaimed once running, and every peer holds its
        admissions until it runs (so the memory it needs frees up as their requests finish)."""
        self._passes.pop(request_id, None)
        self.starving.add(request_id)
        self.holds.append((request_id, True))

    def _end_starving(self, request_id: str) -> bool:
        """If the request starved, it no longer does and its peers' hold ends; whether it did."""
        if request_id not in self.starving:
            return False
        self.starving.discard(request_id)
        self.holds.append((request_id, False))
        return True

    def take_holds(self) -> list[tuple[str, bool]]:
        holds, self.holds = self.holds, []
        return holds

    def set_peer_hold(self, home: int, request_id: str, on: bool) -> None:
        if on:
            self.peer_holds.add((home, request_id))
        else:
            self.peer_holds.discard((home, request_id))

    def drop_peer_holds(self, home: int) -> None:
        """`home` died: its holds end."""
        self.peer_holds = {hold for hold in self.peer_holds if hold[0] != home}

    def _plan_reclaims(self, head: Request) -> None:
        """Requests larger than one instance yield to those that fit one: when the head fits
        this instance but its blocks are lent out, or held by a running request of this home
        that spans instances, ask for them back (most blocks first) until the head would fit.
        Nothing is asked if even all of them would not make room."""
        holding = self._yielding_blocks()
        self._reclaiming &= holding.keys()
        short = self.kv.num_blocks_needed(head.request_id, head.num_tokens) - self.kv.rm.num_free
        short -= sum(holding[rid][1] for rid in self._reclaiming)  # already on their way back
        candidates = sorted((item for item in holding.items() if item[0] not in self._reclaiming),
                            key=lambda item: (-item[1][1], item[0]))
        if short <= 0 or short > sum(n for _, (_, n) in candidates):
            return
        for rid, (home, n) in candidates:
            if short <= 0:
                break
            self.reclaims.append((home, rid))
            self._reclaiming.add(rid)
            short -= n

    def _yielding_blocks(self) -> dict[str, tuple[int, int]]:
        """request -> (its home, blocks of this pool it holds) for the requests that yield: those
        holding lent blocks here, and this home's running requests that span instances."""
        rm = self.kv.rm
        holding = rm.yielding_lent()
        own = rm.own_blocks()
        for request in self.running:
            if request.request_id in self._unyielding:
                continue
            if self._spans_instances(request) and own.get(request.request_id):
                holding[request.request_id] = (self.kv.home, len(own[request.request_id]))
        return holding

    def take_reclaims(self) -> list[tuple[int, str]]:
        reclaims, self.reclaims = self.reclaims, []
        return reclaims

    def reclaim(self, request_id: str) -> Optional[Request]:
        """A creditor wants its blocks back: recompute the request later (preemption). Returns
        it if it was running."""
        request = self.requests.get(request_id)
        if request is None or request not in self.running:
            return None
        self._preempt(request)
        return request

    def _spans_instances(self, request: Request) -> bool:
        return self.kv.spans_instances(request.num_tokens)

    # -------------------------------------------------------------------- update
    def update(self, output: SchedulerOutput, results: Iterable[SampleResult], now: float) -> list[Request]:
        """Apply a step's results: advance computed tokens, append samples, finish requests.

        Returns the requests that produced a token or finished this step.
        """
        sampled = {r.request_id: r for r in results}
        progressed: list[Request] = []
        for work in output.batch:
            request = self.requests.get(work.request_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            request.num_computed_tokens = work.end_pos
            if not work.sample:
                continue
            result = sampled.get(work.request_id)
            if result is None:
                raise RuntimeError(f"no sample returned for request {work.request_id!r}")
            if result.error is not None:
                self._finish(request, FinishReason.ABORT, now)
                progressed.append(request)
                continue
            request.output_token_ids.append(result.token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            progressed.append(request)
            reason = self._token_stop_reason(request, result.token_id)
            if reason is not None:
                self._finish(request, reason, now)
        return progressed

    def _token_stop_reason(self, request: Request, token_id: int) -> Optional[FinishReason]:
        params = request.sampling
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.max_output_tokens:
            return FinishReason.LENGTH
        return None

    eos_token_ids: frozenset[int] = frozenset()

    def finish(self, request_id: str, reason: FinishReason, now: Optional[float] = None) -> None:
        request = self.requests[request_id]
        if not request.is_finished:
            self._finish(request, reason, now)

    def _finish(self, request: Request, reason: FinishReason, now: Optional[float] = None) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        self._passes.pop(request.request_id, None)
        self._unyielding.discard(request.request_id)
        self._end_starving(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_time = now

    def pop_finished(self, request_id: str) -> None:
        """Forget a finished request (the engine has delivered its last output)."""
        request = self.requests.get(request_id)
        if request is not None and request.is_finished:
            del self.requests[request_id]
