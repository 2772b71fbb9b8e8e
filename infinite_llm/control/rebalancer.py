"""Greedy KV rebalancer on the performance model (pure Python, no torch).

Every instance runs its own loop, so the planner models each one on its own clock. Instance i
takes `T_i = perf.decode_step_time(batch_i, kv_i)` per step, where `kv_i` counts every KV token
held on i: its own requests' and its guests' (requests homed elsewhere whose blocks it holds).
A request's attention runs on its home and on every holder of its blocks, and each layer its
home waits for the slowest of them, so a request homed at d with holders H advances at
`1 / max(T_d, max_{h in H} T_h)` tokens/s; a request entirely at home at `1 / T_d`. Requests the
caller does not list (they are part of `batch_size`, their KV is `unlisted_kv_tokens`) are
local-only. Cluster throughput is the sum of these rates (`predicted_throughput`).

Moving `k` full, immutable blocks of request r from an instance holding them (`src`, home or
not) to another (`dst`, home or not):
- src reads `k * block_size` fewer KV tokens, dst as many more; r's holder set gains dst and
  loses src if nothing of r stays there (the home always stays: it computes r);
- memory freed at src lets requests waiting for memory in: `floor(freed / avg_request_tokens)`
  of them (counting everything freed at src this round, capped by `num_waiting_for_memory`),
  each adding one sequence and `avg_request_tokens` of KV to src. Memory that was free already
  is assumed spoken for (decode growth), which keeps the estimate conservative;
- capacity: a dst other than r's home takes at most its `lendable`, r's home its `num_free`; an
  instance with requests waiting for memory receives nothing (its free memory is theirs).

Only the requests of the instances a move changes can change pace, so a move is judged on them:
it qualifies when their throughput rises by more than `min_gain` (relative) and the tokens/s it
adds, counted over `horizon_s`, exceed the tokens the copy costs (their throughput times
`k * copy_s_per_block`). Among qualifying moves the one with the largest net gain wins.

Two kinds of moves are evaluated, which bounds the work (256 instances and thousands of requests
plan in well under a second):
- *free memory*: at each instance with requests waiting for memory, its longest request with
  movable blocks there moves blocks to one target, from a shortlist of the instances that are fastest or
  lose least per moved token (plus the request's home). Sizes tried: the smallest that admits
  1, 2, ... waiting requests, the one balancing src and dst step times, powers of two, the most.
- *spread*: a request already split over several instances (it borrowed because it did not fit)
  is levelled in one move: blocks drain from its slowest holders and fill the fastest
  instances (its home, its holders, the fastest eligible instances) until they meet at one step
  time. A one-source, one-target move cannot do this: with several equally slow holders,
  relieving one of them leaves the request as slow as before, so no such move gains. Sizes
  tried: the level's amount and its halvings, also stopping where other holders that cannot
  move set the request's pace.
A request that fits at home (unsplit, its home has nobody waiting for memory) is never split,
and a cluster where nobody waits for memory and no request is split is left alone.

Greedy loop: each iteration picks the best qualifying move and applies it to a private copy of
the state, so later moves see it; it stops when none qualifies or after `max_moves_per_round`
moves (a spread is one move, possibly several `Migration`s). An instance that sent KV in a round
receives none and vice versa, so no block is ordered twice. Ties go to the first candidate in a
fixed order (free-memory moves by source then target id, then spreads by request id): the plan
is deterministic. Every applied move raises the predicted throughput of the state
`apply_migrations` returns by exactly the gain it was chosen for, so as long as nothing else
changes, repeated planning cannot move blocks back and forth: throughput only rises, and it
stops once no move gains `min_gain`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

from infinite_llm.control.perf_model import PerfModel

# Candidate sizes evaluated for "admit j waiting requests" are thinned to at most this many.
_MAX_ADMISSION_CANDIDATES = 16
# Targets of a free-memory move: this many fastest and this many least-loaded instances.
_TARGET_SHORTLIST = 4
# A spread fills at most this many instances besides the request's own.
_SPREAD_TARGETS = 32
# A spread also tries this many successively halved amounts.
_SPREAD_HALVINGS = 5
# Relative gains below this are floating-point noise, whatever min_gain says.
_GAIN_EPSILON = 1e-9


# --------------------------------------------------------------------------- public values
@dataclass
class RequestKV:
    """Where one running request's KV lives.

    tokens_by_instance: KV tokens of the request held on each instance (home included).
    movable_blocks: instance -> full, immutable blocks of the request held there (home
    included); only these may move.
    """

    request_id: str
    home: int
    tokens_by_instance: dict[int, int]
    movable_blocks: dict[int, int]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_by_instance.values())


@dataclass
class InstanceView:
    """What the gManager knows about one instance.

    lendable: blocks it may still lend (its lend cap minus what it lent, at most num_free).
    batch_size: requests homed here that run, listed in `requests` or not.
    avg_request_tokens: expected KV tokens of a request it would admit (0: unknown).
    unlisted_kv_tokens: KV tokens held here by running requests that are not listed.
    """

    instance_id: int
    num_blocks: int
    num_free: int
    lendable: int
    batch_size: int
    num_waiting_for_memory: int = 0
    avg_request_tokens: float = 0
    unlisted_kv_tokens: int = 0
    host: str = ""  # instances on one host copy blocks without crossing the network


@dataclass(frozen=True)
class Migration:
    """Move `num_blocks` full blocks of `request_id` from instance `src` to instance `dst`."""

    request_id: str
    src: int
    dst: int
    num_blocks: int


@dataclass
class RebalancerConfig:
    block_size: int
    # Relative throughput gain (of the requests a move touches) a move must exceed.
    min_gain: float = 0.02
    # Greedy iterations per round (a spread is one, possibly several Migrations).
    max_moves_per_round: int = 16
    # Seconds one block's copy costs the requests it touches: block bytes / link bandwidth.
    copy_s_per_block: float = 0.0
    # Seconds over which a move's gain is counted against its copy cost (the rebalance period).
    horizon_s: float = 1.0
    # A block copied between two hosts costs this many times `copy_s_per_block` (the network is
    # slower than the links within a host).
    cross_host_copy_factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"RebalancerConfig.block_size must be an integer >= 1, got {self.block_size!r}")
        if not math.isfinite(self.min_gain) or self.min_gain < 0:
            raise ValueError(f"RebalancerConfig.min_gain must be finite and >= 0, got {self.min_gain}")
        if self.max_moves_per_round < 0:
            raise ValueError(f"RebalancerConfig.max_moves_per_round must be >= 0, got {self.max_moves_per_round}")
        if not math.isfinite(self.copy_s_per_block) or self.copy_s_per_block < 0:
            raise ValueError(
                f"RebalancerConfig.copy_s_per_block must be finite and >= 0, got {self.copy_s_per_block}"
            )
        if not math.isfinite(self.cross_host_copy_factor) or self.cross_host_copy_factor < 1:
            raise ValueError(
                f"RebalancerConfig.cross_host_copy_factor must be finite and >= 1, got {self.cross_host_copy_factor}"
            )
        if not math.isfinite(self.horizon_s) or self.horizon_s <= 0:
            raise ValueError(f"RebalancerConfig.horizon_s must be finite and > 0, got {self.horizon_s}")


# --------------------------------------------------------------------------- planning state
@dataclass
class _Inst:
    """Mutable planning copy of an InstanceView plus derived load."""

    view: InstanceView
    num_free: int
    lendable: int
    waiting: int  # requests still waiting for memory
    avg: float  # KV tokens of a request it would admit
    unlisted_kv: int  # KV of unlisted requests, including ones this plan admits
    batch: int = 0
    local: int = 0  # batch members whose pace depends on this instance alone
    kv: int = 0
    time: float = 0.0
    freed: int = 0  # tokens moved away by this plan
    admitted: int = 0  # waiting requests the freed memory let in
    received: int = 0  # blocks moved here by this plan
    splits: set[str] = field(default_factory=set)  # split requests homed or held here
    version: int = 0  # bumped on every change; keys the evaluation cache


@dataclass
class _Req:
    request_id: str
    home: int
    total: int
    tokens: dict[int, int]
    movable: dict[int, int]

    def instances(self) -> list[int]:
        """Its home and every instance holding some of its KV."""
        return sorted({self.home} | {i for i, t in self.tokens.items() if t > 0})

    def is_split(self) -> bool:
        return any(t > 0 for i, t in self.tokens.items() if i != self.home)


@dataclass
class _State:
    block_size: int
    perf: Optional[PerfModel]
    inst: dict[int, _Inst] = field(default_factory=dict)
    reqs: dict[str, _Req] = field(default_factory=dict)
    split_ids: set[str] = field(default_factory=set)
    movable_at: dict[int, list[_Req]] = field(default_factory=dict)  # longest first
    senders: set[int] = field(default_factory=set)
    receivers: set[int] = field(default_factory=set)
    # key -> ((instance, version) it depended on, result): a move changes a few instances, so
    # most candidates need no re-evaluation in the next iteration.
    cache: dict[tuple, tuple[tuple[tuple[int, int], ...], Optional["_Decision"]]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Decision:
    score: float  # tokens gained over the horizon, net of the copy
    request_id: str
    flows: tuple[tuple[int, int], ...]  # (instance, blocks out (> 0) or in (< 0)), by instance


@dataclass
class _Context:
    """What every size of one candidate move shares: who it touches, their pace before."""

    request: _Req
    changed: list[int]  # instances whose load it may change (the request's home included)
    before: float  # tokens/s of the touched requests now
    local: dict[int, int]  # per changed instance: requests paced by it alone, the moved one aside
    others: list[tuple[float, list[int]]]  # other split requests: slowest untouched, touched
    r_fixed: float  # the moved request's slowest untouched instance
    deps: list[int]  # every instance the evaluation read


# --------------------------------------------------------------------------- public functions
def plan_migrations(instances: list[InstanceView], requests: list[RequestKV], perf: PerfModel,
                    cfg: RebalancerConfig) -> list[Migration]:
    """Plan one round of migrations (see the module docstring). The inputs are not modified.

    Moves of the same request between the same pair are merged; the list is in decision order.
    """
    state = _build_state(instances, requests, cfg.block_size, perf)
    if not (state.split_ids or any(i.waiting > 0 for i in state.inst.values())):
        return []  # not memory-bound: every request fits at home and nobody waits
    decided: list[Migration] = []
    for _ in range(cfg.max_moves_per_round):
        decision = _best_decision(state, cfg)
        if decision is None:
            break
        _apply_flows(state, state.reqs[decision.request_id], dict(decision.flows))
        decided.extend(Migration(decision.request_id, src, dst, n) for src, dst, n in _pair_flows(decision.flows))
    return _merge(decided)


def apply_migrations(instances: list[InstanceView], requests: list[RequestKV], moves: Iterable[Migration],
                     block_size: int) -> tuple[list[InstanceView], list[RequestKV]]:
    """The views and requests after `moves`, as the planner predicts them (inputs untouched).

    Blocks change holders, capacities shrink and grow, and memory freed at a source admits
    waiting requests (they join its batch and `unlisted_kv_tokens`). Raises ValueError for a
    move the state cannot carry (unknown request, too few movable blocks, no room at dst).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    state = _build_state(instances, requests, block_size, None)
    moved: set[str] = set()
    for m in moves:
        req = state.reqs.get(m.request_id)
        if req is None:
            raise ValueError(f"migration of unknown request {m.request_id!r}")
        _check_move(state, req, m)
        _apply_flows(state, req, {m.src: m.num_blocks, m.dst: -m.num_blocks})
        moved.add(req.request_id)
    views = [_export_view(state.inst[v.instance_id]) for v in instances]
    return views, [_export_request(state.reqs[r.request_id]) if r.request_id in moved
                   else replace(r, tokens_by_instance=dict(r.tokens_by_instance),
                                movable_blocks=dict(r.movable_blocks))
                   for r in requests]


def predicted_rates(instances: list[InstanceView], requests: list[RequestKV], perf: PerfModel) -> dict[str, float]:
    """Decode tokens/s of each listed request: 1 / its slowest instance's step time."""
    state = _build_state(instances, requests, None, perf)
    return {r.request_id: 1.0 / _positive(_slowest(state, r)) for r in state.reqs.values()}


def predicted_throughput(instances: list[InstanceView], requests: list[RequestKV], perf: PerfModel) -> float:
    """Decode tokens/s of the whole cluster: every running request's rate, summed."""
    state = _build_state(instances, requests, None, perf)
    total = 0.0
    for i in sorted(state.inst):
        inst = state.inst[i]
        if inst.local:
            total += inst.local / _positive(inst.time)
    for rid in sorted(state.split_ids):
        total += 1.0 / _positive(_slowest(state, state.reqs[rid]))
    return total


# --------------------------------------------------------------------------- building the state
def _build_state(views: list[InstanceView], requests: list[RequestKV], block_size: Optional[int],
                 perf: Optional[PerfModel]) -> _State:
    state = _State(block_size=block_size or 1, perf=perf)
    for view in views:
        _validate_view(view)
        if view.instance_id in state.inst:
            raise ValueError(f"duplicate InstanceView for instance {view.instance_id}")
        state.inst[view.instance_id] = _Inst(
            view=view, num_free=view.num_free, lendable=view.lendable, waiting=view.num_waiting_for_memory,
            avg=0.0, unlisted_kv=view.unlisted_kv_tokens, kv=view.unlisted_kv_tokens)
    homed: dict[int, int] = {}
    for r in requests:
        if r.request_id in state.reqs:
            raise ValueError(f"duplicate RequestKV for request {r.request_id!r}")
        req = _make_request(r, state.inst, block_size)
        state.reqs[req.request_id] = req
        homed[req.home] = homed.get(req.home, 0) + 1
        for i, tokens in req.tokens.items():
            state.inst[i].kv += tokens
        for i, blocks in req.movable.items():
            if blocks > 0:
                state.movable_at.setdefault(i, []).append(req)
    for i, inst in state.inst.items():
        # A view may lag its own requests; the listed ones run whatever it says.
        inst.batch = inst.local = max(inst.view.batch_size, homed.get(i, 0))
        _refresh_time(state, inst)
    for req in state.reqs.values():
        if req.is_split():
            _mark_split(state, req, True)
    for reqs in state.movable_at.values():
        reqs.sort(key=lambda q: (-q.total, q.request_id))
    _set_admission_sizes(state)
    return state


def _make_request(r: RequestKV, instances: dict[int, _Inst], block_size: Optional[int]) -> _Req:
    rid = r.request_id
    if r.home not in instances:
        raise ValueError(f"request {rid!r} has home {r.home}, which has no InstanceView")
    for what, values in (("KV tokens", r.tokens_by_instance), ("movable blocks", r.movable_blocks)):
        for i, value in values.items():
            if i not in instances:
                raise ValueError(f"request {rid!r} has {what} on instance {i}, which has no InstanceView")
            if value < 0:
                raise ValueError(f"request {rid!r} has {value} {what} on instance {i}")
    if block_size is not None:
        for i, blocks in r.movable_blocks.items():
            if blocks * block_size > r.tokens_by_instance.get(i, 0):
                raise ValueError(
                    f"request {rid!r}: {blocks} movable blocks on instance {i} need {blocks * block_size} "
                    f"tokens, but only {r.tokens_by_instance.get(i, 0)} are there")
    return _Req(rid, r.home, r.total_tokens, dict(r.tokens_by_instance), dict(r.movable_blocks))


def _validate_view(view: InstanceView) -> None:
    for name in ("num_blocks", "num_free", "lendable", "batch_size", "num_waiting_for_memory",
                 "unlisted_kv_tokens"):
        value = getattr(view, name)
        if value < 0:
            raise ValueError(f"InstanceView {view.instance_id}: {name} must be >= 0, got {value}")
    if view.num_free > view.num_blocks:
        raise ValueError(f"InstanceView {view.instance_id}: num_free {view.num_free} > num_blocks {view.num_blocks}")
    if view.lendable > view.num_free:
        raise ValueError(f"InstanceView {view.instance_id}: lendable {view.lendable} > num_free {view.num_free}")
    if not (math.isfinite(view.avg_request_tokens) and view.avg_request_tokens >= 0):
        raise ValueError(f"InstanceView {view.instance_id}: avg_request_tokens must be finite and >= 0")


def _set_admission_sizes(state: _State) -> None:
    """Size of a request an instance would admit: its own average, else the cluster's, else
    the listed requests' average, else one block."""
    known = sorted(i.view.avg_request_tokens for i in state.inst.values() if i.view.avg_request_tokens > 0)
    if known:
        fallback = sum(known) / len(known)
    elif state.reqs:
        fallback = sum(r.total for r in state.reqs.values()) / len(state.reqs)
    else:
        fallback = 0.0
    for inst in state.inst.values():
        inst.avg = inst.view.avg_request_tokens or fallback or float(state.block_size)


# --------------------------------------------------------------------------- the model
def _positive(step_time: float) -> float:
    if step_time <= 0:
        raise ValueError("the perf model predicts a zero step time; it cannot rank migrations")
    return step_time


def _step_time(perf: PerfModel, batch: int, kv_tokens: int) -> float:
    return perf.decode_step_time(batch, max(0, kv_tokens))


def _refresh_time(state: _State, inst: _Inst) -> None:
    if state.perf is not None:
        inst.time = _step_time(state.perf, inst.batch, inst.kv)


def _slowest(state: _State, req: _Req) -> float:
    return max(state.inst[i].time for i in req.instances())


def _admit(inst: _Inst, freed_tokens: int) -> int:
    """Waiting requests that `freed_tokens` more (with what this plan freed there) let in."""
    if inst.waiting <= 0 or freed_tokens <= 0:
        return 0
    return min(inst.waiting, int((inst.freed + freed_tokens) // inst.avg) - inst.admitted)


def _admitted_kv(inst: _Inst, extra: int) -> int:
    """KV tokens that `extra` more admitted requests add (rounded on the total, so the order of
    moves does not change the result)."""
    return round((inst.admitted + extra) * inst.avg) - round(inst.admitted * inst.avg)


def _room(state: _State, req: _Req, dst: int) -> int:
    """Blocks of `req` that `dst` may take now."""
    inst = state.inst[dst]
    if dst in state.senders or inst.waiting > 0:
        return 0
    return max(0, inst.num_free if dst == req.home else inst.lendable)


# --------------------------------------------------------------------------- applying moves
def _apply_flows(state: _State, req: _Req, flows: dict[int, int]) -> None:
    """Move blocks of `req`: flows[i] > 0 leave instance i, < 0 arrive there."""
    was_split, before = req.is_split(), req.instances()
    for i, blocks in sorted(flows.items()):
        if blocks > 0:
            _send(state, state.inst[i], req, i, blocks)
        elif blocks < 0:
            _receive(state, state.inst[i], req, i, -blocks)
    if was_split:
        _mark_split(state, req, False, before)
    if req.is_split():
        _mark_split(state, req, True)
    for i in set(flows) | set(before) | set(req.instances()):
        _refresh_time(state, state.inst[i])
        state.inst[i].version += 1


def _send(state: _State, inst: _Inst, req: _Req, i: int, blocks: int) -> None:
    tokens = blocks * state.block_size
    admitted = _admit(inst, tokens)
    added_kv = _admitted_kv(inst, admitted)
    inst.kv += added_kv - tokens
    inst.unlisted_kv += added_kv
    inst.batch += admitted
    inst.local += admitted
    inst.waiting -= admitted
    inst.admitted += admitted
    inst.freed += tokens
    req.tokens[i] -= tokens
    req.movable[i] -= blocks
    if i != req.home:
        inst.lendable += blocks  # the loan shrinks
    _refresh_free(state, inst)
    state.senders.add(i)


def _receive(state: _State, inst: _Inst, req: _Req, i: int, blocks: int) -> None:
    req.tokens[i] = req.tokens.get(i, 0) + blocks * state.block_size
    req.movable[i] = req.movable.get(i, 0) + blocks
    inst.kv += blocks * state.block_size
    inst.received += blocks
    if i != req.home:
        inst.lendable -= blocks
    _refresh_free(state, inst)
    state.receivers.add(i)


def _refresh_free(state: _State, inst: _Inst) -> None:
    kept = inst.freed - round(inst.admitted * inst.avg)  # freed, not taken by admitted requests
    inst.num_free = min(inst.view.num_blocks, inst.view.num_free - inst.received + kept // state.block_size)
    inst.lendable = min(inst.lendable, inst.num_free)


def _mark_split(state: _State, req: _Req, split: bool, instances: Optional[list[int]] = None) -> None:
    """Register `req` as split (on its instances) or take it back; a split request is paced by
    all its instances, so it no longer counts as its home's local request."""
    rid = req.request_id
    for i in instances if instances is not None else req.instances():
        if split:
            state.inst[i].splits.add(rid)
        else:
            state.inst[i].splits.discard(rid)
    if split:
        state.split_ids.add(rid)
    else:
        state.split_ids.discard(rid)
    state.inst[req.home].local += -1 if split else 1


def _check_move(state: _State, req: _Req, m: Migration) -> None:
    if m.num_blocks <= 0 or m.src == m.dst:
        raise ValueError(f"migration {m}: needs num_blocks > 0 and src != dst")
    if m.dst not in state.inst or m.src not in state.inst:
        raise ValueError(f"migration {m}: src and dst need an InstanceView")
    if req.movable.get(m.src, 0) < m.num_blocks:
        raise ValueError(f"migration {m}: only {req.movable.get(m.src, 0)} movable blocks on {m.src}")
    dst = state.inst[m.dst]
    room = dst.num_free if m.dst == req.home else dst.lendable
    if room < m.num_blocks:
        raise ValueError(f"migration {m}: instance {m.dst} has room for {room} blocks")


def _export_view(inst: _Inst) -> InstanceView:
    return replace(inst.view, num_free=inst.num_free, lendable=inst.lendable, batch_size=inst.batch,
                   num_waiting_for_memory=inst.waiting, unlisted_kv_tokens=inst.unlisted_kv)


def _export_request(req: _Req) -> RequestKV:
    tokens = {i: t for i, t in sorted(req.tokens.items()) if t > 0 or i == req.home}
    movable = {i: b for i, b in sorted(req.movable.items()) if b > 0}
    return RequestKV(req.request_id, req.home, tokens, movable)


# --------------------------------------------------------------------------- choosing a move
def _best_decision(state: _State, cfg: RebalancerConfig) -> Optional[_Decision]:
    """The qualifying move with the largest net gain, or None."""
    eligible = sorted((i for i, inst in state.inst.items()
                       if i not in state.senders and inst.waiting == 0 and inst.lendable > 0),
                      key=lambda i: (state.inst[i].time, i))
    targets = _shortlist(state, eligible)
    best: Optional[_Decision] = None
    for w in sorted(state.inst):
        if state.inst[w].waiting == 0 or w in state.receivers:
            continue
        req = _longest_movable(state, w)
        if req is None:
            continue
        extra = [req.home] if req.home != w and _room(state, req, req.home) > 0 else []
        for c in sorted(set(targets) | set(extra)):
            if c != w:
                best = _better(best, _cached(state, ("free", w, req.request_id, c),
                                             lambda c=c: _free_memory_move(state, cfg, w, req, c)))
    sinks = tuple(sorted(eligible[:_SPREAD_TARGETS]))
    for rid in sorted(state.split_ids):
        req = state.reqs[rid]
        best = _better(best, _cached(state, ("spread", rid), lambda: _spread_move(state, cfg, req, sinks)))
    return best


def _shortlist(state: _State, eligible: list[int]) -> list[int]:
    """Targets for free-memory moves: the fastest instances, and those whose requests lose least
    per moved token (requests paced by it / its step time squared)."""
    def loss(i: int) -> tuple[float, float, int]:
        inst = state.inst[i]
        paced = inst.local + len(inst.splits)
        return (paced / inst.time ** 2 if paced and inst.time > 0 else 0.0, inst.time, i)

    return sorted(set(eligible[:_TARGET_SHORTLIST]) | set(sorted(eligible, key=loss)[:_TARGET_SHORTLIST]))


def _longest_movable(state: _State, instance: int) -> Optional[_Req]:
    for req in state.movable_at.get(instance, []):
        if req.movable.get(instance, 0) > 0:
            return req
    return None


def _better(best: Optional[_Decision], other: Optional[_Decision]) -> Optional[_Decision]:
    # Strictly better only: the earlier candidate wins ties.
    return other if other is not None and (best is None or other.score > best.score) else best


def _cached(state: _State, key: tuple,
            evaluate: Callable[[], tuple[Optional[_Decision], list[int]]]) -> Optional[_Decision]:
    entry = state.cache.get(key)
    if entry is not None and all(state.inst[i].version == v for i, v in entry[0]):
        return entry[1]
    decision, deps = evaluate()
    state.cache[key] = (tuple((i, state.inst[i].version) for i in deps), decision)
    return decision


# --------------------------------------------------------------------------- evaluation
def _context(state: _State, req: _Req, changed_ids: Iterable[int]) -> _Context:
    changed = sorted(set(changed_ids) | {req.home})
    inside = set(changed)
    before = 0.0
    local: dict[int, int] = {}
    for i in changed:
        inst = state.inst[i]
        local[i] = inst.local - (1 if i == req.home and not req.is_split() else 0)
        if local[i]:
            before += local[i] / _positive(inst.time)
    deps = inside | set(req.instances())
    others = []
    for rid in sorted(set().union(*(state.inst[i].splits for i in changed)) - {req.request_id}):
        instances = state.reqs[rid].instances()
        deps.update(instances)
        before += 1.0 / _positive(max(state.inst[j].time for j in instances))
        fixed = max((state.inst[j].time for j in instances if j not in inside), default=0.0)
        others.append((fixed, [j for j in instances if j in inside]))
    before += 1.0 / _positive(_slowest(state, req))
    r_fixed = max((state.inst[j].time for j in req.instances() if j not in inside), default=0.0)
    return _Context(req, changed, before, local, others, r_fixed, sorted(deps))


def _after(state: _State, ctx: _Context, flows: dict[int, int]) -> float:
    """Tokens/s of the touched requests once `flows` (all within ctx.changed) are applied."""
    bs, req = state.block_size, ctx.request
    new_time: dict[int, float] = {}
    total = 0.0
    for i in ctx.changed:
        inst, blocks, admitted = state.inst[i], flows.get(i, 0), 0
        if blocks == 0:
            new_time[i] = inst.time
        else:
            admitted = _admit(inst, blocks * bs) if blocks > 0 else 0
            kv = inst.kv - blocks * bs + _admitted_kv(inst, admitted)
            new_time[i] = _step_time(state.perf, inst.batch + admitted, kv)
        if ctx.local[i] + admitted:
            total += (ctx.local[i] + admitted) / _positive(new_time[i])
    for fixed, touched in ctx.others:
        total += 1.0 / _positive(max(fixed, max(new_time[j] for j in touched)))
    slowest = ctx.r_fixed
    for i in ctx.changed:
        if i == req.home or req.tokens.get(i, 0) - flows.get(i, 0) * bs > 0:
            slowest = max(slowest, new_time[i])
    return total + 1.0 / _positive(slowest)


def _judge(state: _State, cfg: RebalancerConfig, ctx: _Context, flows: dict[int, int]) -> Optional[_Decision]:
    """The move if it qualifies: relative gain above min_gain, and gain over the horizon above
    the tokens its copy costs the touched requests."""
    delta = _after(state, ctx, flows) - ctx.before
    gain = delta / ctx.before if ctx.before > 0 else (math.inf if delta > 0 else 0.0)
    lost = ctx.before * _copy_s(state, cfg, flows)
    net = delta * cfg.horizon_s - lost
    if not (gain > max(cfg.min_gain, _GAIN_EPSILON) and net > 0):
        return None
    return _Decision(net, ctx.request.request_id, tuple(sorted(flows.items())))


def _copy_s(state: _State, cfg: RebalancerConfig, flows: dict[int, int]) -> float:
    """Link seconds of a move's copies: blocks leave the sources (positive flows) for the
    destinations (negative), paired in order; a pair on different hosts costs the cross-host
    factor per block."""
    sources = [[i, k] for i, k in sorted(flows.items()) if k > 0]
    cost = 0.0
    for dst, inflow in sorted(flows.items()):
        need = -inflow
        for source in sources:
            if need <= 0:
                break
            take = min(need, source[1])
            if take <= 0:
                continue
            same = state.inst[source[0]].view.host == state.inst[dst].view.host
            cost += take * cfg.copy_s_per_block * (1.0 if same else cfg.cross_host_copy_factor)
            source[1] -= take
            need -= take
    return cost


def _free_memory_move(state: _State, cfg: RebalancerConfig, src: int, req: _Req,
                      dst: int) -> tuple[Optional[_Decision], list[int]]:
    """Best single-source move of `req`'s blocks from `src` (which has requests waiting for
    memory) to `dst`."""
    max_blocks = min(_room(state, req, dst), req.movable.get(src, 0))
    if max_blocks <= 0:
        return None, sorted({src, dst} | set(req.instances()))
    ctx = _context(state, req, [src, dst])
    best: Optional[_Decision] = None
    # Sizes ascend, so on equal gains the smaller move (less traffic) is kept.
    for k in _free_memory_sizes(state, state.inst[src], state.inst[dst], max_blocks):
        best = _better(best, _judge(state, cfg, ctx, {src: k, dst: -k}))
    return best, ctx.deps


def _free_memory_sizes(state: _State, src: _Inst, dst: _Inst, max_blocks: int) -> list[int]:
    bs = state.block_size
    sizes = {max_blocks}
    power = 1
    while power < max_blocks:
        sizes.add(power)
        power *= 2
    max_admissible = _admit(src, max_blocks * bs)
    step = max(1, math.ceil(max_admissible / _MAX_ADMISSION_CANDIDATES))
    slope = state.perf.t_per_kv_token * bs  # step time per moved block
    for j in sorted({0, max_admissible, *range(1, max_admissible + 1, step)}):
        if j > 0:
            sizes.add(_blocks_to_admit(src, j, bs, max_blocks))
        if slope > 0:
            # With j admitted, src's step time falls and dst's rises linearly in k; where they
            # meet, the slower of the two is as fast as it gets.
            time_src = _step_time(state.perf, src.batch + j, src.kv + _admitted_kv(src, j))
            balance = (time_src - dst.time) / (2 * slope)
            sizes.update(k for k in (math.floor(balance), math.ceil(balance)) if 1 <= k <= max_blocks)
    return sorted(sizes)


def _blocks_to_admit(src: _Inst, count: int, block_size: int, max_blocks: int) -> int:
    """The fewest blocks (at most max_blocks) whose moving lets `count` waiting requests in."""
    needed = (src.admitted + count) * src.avg - src.freed
    k = min(max_blocks, max(1, math.ceil(needed / block_size)))
    while k < max_blocks and _admit(src, k * block_size) < count:
        k += 1
    return k


# --------------------------------------------------------------------------- spreading
def _spread_move(state: _State, cfg: RebalancerConfig, req: _Req,
                 sinks: tuple[int, ...]) -> tuple[Optional[_Decision], list[int]]:
    """Best levelling of split request `req`: drain its slowest holders into the fastest
    instances among its own and `sinks`.

    The result depends on the request's instances and on the sinks below the level only: a sink
    above it takes nothing, and one that replaces it in the shortlist (the shortlist changes
    only when a member is modified) is slower still. So only those are dependencies.
    """
    slope = state.perf.t_per_kv_token * state.block_size
    parties = _spread_parties(state, req, sinks, slope) if slope > 0 else {}
    if not parties:
        return None, req.instances()  # moving KV changes no step time, or nobody can take part
    # In block units, instance i sits at level u = T_i / slope; moving x blocks shifts it by x.
    level = _level([(u, -take, give) for u, give, take in parties.values()], 0.0)
    deps = set(req.instances()) | {i for i, (u, _, _) in parties.items() if u < level}
    givers = [(u, give, i) for i, (u, give, _) in parties.items() if give > 0 and u > level]
    takers = [(u, take, i) for i, (u, _, take) in parties.items() if take > 0 and u < level]
    sizes = _spread_sizes(state, req, level, givers, takers, slope) if givers and takers else []
    if not sizes:
        return None, sorted(deps)
    options = [(k, _spread_flows(givers, takers, k)) for k in sizes]
    ctx = _context(state, req, {i for _, flows in options for i in flows})
    best: Optional[_Decision] = None
    for k, flows in options:
        best = _better(best, _judge(state, cfg, ctx, flows))
    return best, sorted(deps | set(ctx.deps))


def _spread_parties(state: _State, req: _Req, sinks: tuple[int, ...],
                    slope: float) -> dict[int, tuple[float, int, int]]:
    """instance -> (level, blocks of req it may give, blocks of req it may take)."""
    parties = {}
    for i in sorted(set(req.instances()) | set(sinks)):
        give = 0 if i in state.receivers else req.movable.get(i, 0)
        take = _room(state, req, i)
        if give > 0 or take > 0:
            parties[i] = (state.inst[i].time / slope, give, take)
    return parties


def _spread_sizes(state: _State, req: _Req, level: float, givers: list[tuple[float, int, int]],
                  takers: list[tuple[float, int, int]], slope: float) -> list[int]:
    """Amounts to try: everything down to the common level, and where the request's
    instances that take no part (no movable blocks, or received this round) already pace it;
    each with its halvings (a smaller move may hurt the targets' own requests less)."""
    balanced = int(min(sum(min(g, u - level) for u, g, _ in givers),
                       sum(min(t, level - u) for u, t, _ in takers)))
    moving = {i for *_, i in givers} | {i for *_, i in takers}
    fixed = max((state.inst[i].time / slope for i in req.instances() if i not in moving), default=None)
    capped = balanced if fixed is None else min(balanced, int(sum(min(g, max(0.0, u - fixed))
                                                                  for u, g, _ in givers)))
    return sorted({k >> s for k in (balanced, capped) for s in range(min(_SPREAD_HALVINGS, k.bit_length()))})


def _spread_flows(givers: list[tuple[float, int, int]], takers: list[tuple[float, int, int]],
                  k: int) -> dict[int, int]:
    """k blocks from the highest givers to the lowest takers, each side levelled."""
    flows = dict(_drain(givers, k))
    flows.update((i, -y) for i, y in _drain([(-u, cap, i) for u, cap, i in takers], k).items())
    return flows


def _level(pieces: list[tuple[float, float, float]], target: float) -> float:
    """The level L at which sum(clamp(u - L, lo, hi)) over (u, lo, hi) equals `target` (the sum
    falls as L rises, piecewise linearly; a target out of range gives the nearest end)."""
    # Sweep L upwards: piece i falls with slope -1 between u - hi and u - lo.
    events = sorted([(u - hi, 1) for u, _, hi in pieces] + [(u - lo, -1) for u, lo, _ in pieces])
    value = sum(hi for _, _, hi in pieces)
    level, falling = events[0][0], 0
    for point, change in events:
        drop = falling * (point - level)
        if value - drop <= target:
            return level + (value - target) / falling if falling else level
        value -= drop
        level = point
        falling += change
    return level


def _drain(entries: list[tuple[float, int, int]], k: int) -> dict[int, int]:
    """Take k whole units from (level, cap, id) entries so that the highest remaining level is
    as low as possible (k <= total cap); ties go to lower ids."""
    lam = _level([(u, 0.0, float(cap)) for u, cap, _ in entries], float(k))
    amounts = {i: int(min(cap, max(0.0, u - lam))) for u, cap, i in entries}
    short = k - sum(amounts.values())
    # Rounding leaves a few units: give them to the highest remaining levels.
    order = sorted(entries, key=lambda e: (-(e[0] - amounts[e[2]]), e[2]))
    while short != 0:
        step = 1 if short > 0 else -1
        pool = order if step > 0 else order[::-1]
        candidates = [i for _, cap, i in pool if (amounts[i] < cap if step > 0 else amounts[i] > 0)]
        if not candidates:
            break
        for i in candidates[:abs(short)]:
            amounts[i] += step
            short -= step
    return {i: x for i, x in amounts.items() if x > 0}


def _pair_flows(flows: tuple[tuple[int, int], ...]) -> list[tuple[int, int, int]]:
    """(src, dst, blocks) orders realising the flows: sources and targets by id, paired in turn."""
    out = [[i, x] for i, x in flows if x > 0]
    into = [[i, -x] for i, x in flows if x < 0]
    orders = []
    a = b = 0
    while a < len(out) and b < len(into):
        n = min(out[a][1], into[b][1])
        orders.append((out[a][0], into[b][0], n))
        out[a][1] -= n
        into[b][1] -= n
        a += out[a][1] == 0
        b += into[b][1] == 0
    return orders


def _merge(moves: list[Migration]) -> list[Migration]:
    merged: dict[tuple[str, int, int], int] = {}
    for m in moves:
        key = (m.request_id, m.src, m.dst)
        merged[key] = merged.get(key, 0) + m.num_blocks
    return [Migration(rid, src, dst, n) for (rid, src, dst), n in merged.items()]


# --------------------------------------------------------------------------- rate limiting
class MigrationRateLimiter:
    """Caps migration traffic at `tokens_per_step` tokens' worth of KV per step.

    A token bucket: each step adds `tokens_per_step` of credit, each moved block spends
    `block_size`, and credit never exceeds one step's worth (or one block, if that is more,
    see below). So with a budget of at least one
    block, no step moves more than `tokens_per_step // block_size` blocks. A budget smaller than
    a block is instead met on average: credit then accumulates up to one block, and a block
    moves every `ceil(block_size / tokens_per_step)` steps or so instead of never.

    Per step: call `blocks_allowed_this_step()` (any number of times, it opens the step once),
    move at most that many blocks, then `record(n)` closes the step.
    """

    def __init__(self, tokens_per_step: int, block_size: int) -> None:
        if isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, int) or tokens_per_step < 0:
            raise ValueError(f"tokens_per_step must be an integer >= 0, got {tokens_per_step!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.tokens_per_step = tokens_per_step
        self.block_size = block_size
        self._credit_cap = max(tokens_per_step, block_size) if tokens_per_step > 0 else 0
        self._credit = 0
        self._step_open = False
        self.num_steps = 0
        self.total_blocks_moved = 0

    def blocks_allowed_this_step(self) -> int:
        if not self._step_open:
            self._credit = min(self._credit + self.tokens_per_step, self._credit_cap)
            self._step_open = True
        return self._credit // self.block_size

    def record(self, blocks_moved: int) -> None:
        """Close the current step, charging `blocks_moved` blocks against its allowance."""
        allowed = self.blocks_allowed_this_step()
        if blocks_moved < 0 or blocks_moved > allowed:
            raise ValueError(f"blocks_moved must be in [0, {allowed}] this step, got {blocks_moved}")
        self._credit -= blocks_moved * self.block_size
        self._step_open = False
        self.num_steps += 1
        self.total_blocks_moved += blocks_moved


__all__ = [
    "InstanceView",
    "Migration",
    "MigrationRateLimiter",
    "RebalancerConfig",
    "RequestKV",
    "apply_migrations",
    "plan_migrations",
    "predicted_rates",
    "predicted_throughput",
]
