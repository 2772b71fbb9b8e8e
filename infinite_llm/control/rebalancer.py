"""Greedy KV rebalancer on the performance model (pure Python, no torch).

Infinite-LLM moves KV between instances so that total throughput rises. An instance whose batch
is small because a few long requests eat its memory is a *debtor*; an instance with spare memory
is a *creditor*. The gManager periodically plans migrations of full, immutable KV blocks from a
debtor's longest request to a creditor; the engine then executes them reserve-first and rate
limited (`MigrationRateLimiter`).

The model behind each decision (all inputs are what the gManager knows, see `InstanceView`):

- An instance's decode step time is `T = perf.decode_step_time(batch, kv)`, where `kv` counts
  every KV token held on it: its own requests' local KV plus what it hosts for other instances'
  requests (guest MicroAttention).
- Throughput in tokens/s is batch / step time, summed over instances. With `lockstep=True` (the
  default, how DistAttention executes: a request's home waits every layer for the partials of
  the instances holding its KV, and they wait for its queries) instances that share work,
  directly or through others, form a group that steps at its slowest member's pace:
  `sum(b) / max(T)` over the group. With `lockstep=False` every instance is independent,
  `sum(b / T)`. A move from d to c joins their groups; it is judged on the throughput of
  those groups before and after (for two unlinked instances: `b_d/T_d + b_c/T_c` before,
  `(b_d' + b_c) / max(T_d', T_c')` after).
- Moving `k` blocks (`k * block_size` tokens) of request r from debtor d to creditor c:
  * d's attention shrinks by the moved tokens, c's grows by them (c's batch is unchanged);
  * the freed memory at d lets requests waiting for memory in: d's batch grows by
    `floor(freed_tokens / avg_request_tokens)`, capped by `num_waiting_for_memory`, and each
    admitted request brings about `avg_request_tokens` of KV that d's attention reads. Tokens
    freed by earlier moves in the same round that did not yet add up to one request carry over.
    Memory that was already free at d is assumed spoken for (decode growth of d's running
    requests), which keeps the estimate conservative.
- `k` is bounded by c's lendable (and free) blocks and by r's full blocks still at home. The
  candidates are: the smallest k that admits 1, 2, ... waiting requests, the k that balances
  the two step times for each such admission count (the lockstep optimum), powers of two, and
  the maximum. The one with the largest throughput gain wins; ties go to the smaller k, i.e.
  less traffic.
- A move qualifies if its relative gain, `after / before - 1` over the touched groups, exceeds
  `min_gain`. Among qualifying moves the largest absolute gain (tokens/s) wins: nothing else
  changes, so that is the move that raises cluster throughput most.

Greedy loop: each iteration evaluates every (debtor, creditor) pair, with the debtor's longest
request that still has movable blocks, and applies the best move to private copies of the views,
so later decisions see it (freed/used memory, grown batch, moved KV, new coupling). It stops when
no move qualifies or after `max_moves_per_round` moves. Ties break by debtor id, then creditor
id, so the plan is deterministic.

Debtor: memory pressure (requests waiting for memory, or free blocks below `low_free_fraction`
of the pool), a batch below `debtor_batch_threshold` if one is set, and a home request with
movable blocks. Creditor: lendable blocks and nobody waiting for memory there. An instance that
sent KV in a round does not receive any in the same round, and vice versa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from infinite_llm.control.perf_model import PerfModel

# Candidate sizes evaluated for "admit j waiting requests" are thinned to at most this many.
_MAX_ADMISSION_CANDIDATES = 32


@dataclass
class RequestKV:
    """Where one running request's KV lives.

    tokens_by_instance: KV tokens of the request held on each instance (home included).
    num_full_blocks_at_home: full, immutable blocks still at home, i.e. movable ones.
    """

    request_id: str
    home: int
    tokens_by_instance: dict[int, int]
    num_full_blocks_at_home: int

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_by_instance.values())


@dataclass
class InstanceView:
    """What the gManager knows about one instance.

    lendable: blocks it may still lend (its lend cap minus what it lent, at most num_free).
    avg_request_tokens: expected KV tokens of a request it would admit (0: unknown).
    """

    instance_id: int
    num_blocks: int
    num_free: int
    lendable: int
    batch_size: int
    num_waiting_for_memory: int = 0
    avg_request_tokens: float = 0


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
    min_gain: float = 0.0  # relative throughput gain (of the groups a move touches) it must exceed
    max_moves_per_round: int = 16
    # An instance is a debtor only if its batch is below this; None: no batch cap, the perf
    # model's gain alone judges whether growing the batch is worth the move.
    debtor_batch_threshold: Optional[int] = None
    # Memory pressure without waiting requests: free blocks below this fraction of the pool.
    low_free_fraction: float = 0.05
    # Instances that share work step together (see the module docstring); False: independent.
    lockstep: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"RebalancerConfig.block_size must be an integer >= 1, got {self.block_size!r}")
        if not math.isfinite(self.min_gain) or self.min_gain < 0:
            raise ValueError(f"RebalancerConfig.min_gain must be finite and >= 0, got {self.min_gain}")
        if self.max_moves_per_round < 0:
            raise ValueError(f"RebalancerConfig.max_moves_per_round must be >= 0, got {self.max_moves_per_round}")
        if self.debtor_batch_threshold is not None and self.debtor_batch_threshold < 1:
            raise ValueError(
                f"RebalancerConfig.debtor_batch_threshold must be >= 1 or None, got {self.debtor_batch_threshold}"
            )
        if not 0 <= self.low_free_fraction <= 1:
            raise ValueError(f"RebalancerConfig.low_free_fraction must be in [0, 1], got {self.low_free_fraction}")


# --------------------------------------------------------------------------- planning state
@dataclass
class _Instance:
    """Mutable planning copy of an InstanceView plus derived load."""

    view: InstanceView
    kv_tokens: int  # KV tokens attention reads here per step (own local + hosted guests)
    avg_request_tokens: float
    initial_free: int
    # Tokens freed by this round's moves and not taken by admitted requests: free memory, but
    # less than one more request's worth (or nobody is left waiting).
    pending_freed_tokens: int = 0

    @property
    def id(self) -> int:
        return self.view.instance_id


@dataclass
class _Request:
    request_id: str
    home: int
    total_tokens: int
    movable_blocks: int


@dataclass(frozen=True)
class _Move:
    delta: float  # change of the touched groups' throughput, tokens/s
    gain: float  # the same relative to their throughput before the move
    debtor: int
    creditor: int
    request_id: str
    num_blocks: int
    admitted: int  # waiting requests the freed memory lets into the debtor's batch


@dataclass
class _Plan:
    instances: dict[int, _Instance]
    requests: list[_Request] = field(default_factory=list)
    # Unordered pairs of instances that share work (one holds KV of a request homed at the other).
    links: set[frozenset[int]] = field(default_factory=set)
    # Roles taken this round: an instance that sent KV does not receive any, and vice versa.
    senders: set[int] = field(default_factory=set)
    receivers: set[int] = field(default_factory=set)
    # (debtor, creditor) -> (state the evaluation depended on, its result); a move only changes
    # a few instances, so most pairs need no re-evaluation in the next iteration.
    pair_cache: dict[tuple[int, int], tuple[tuple, Optional["_Move"]]] = field(default_factory=dict)


def plan_migrations(instances: list[InstanceView], requests: list[RequestKV], perf: PerfModel,
                    cfg: RebalancerConfig) -> list[Migration]:
    """Plan one round of migrations (see the module docstring). The inputs are not modified.

    Moves of the same request between the same pair are merged; the list is in decision order.
    """
    plan = _build_plan(instances, requests, cfg)
    decided: list[Migration] = []
    for _ in range(cfg.max_moves_per_round):
        move = _best_move(plan, perf, cfg)
        if move is None:
            break
        _apply(plan, move, cfg)
        decided.append(Migration(move.request_id, move.debtor, move.creditor, move.num_blocks))
    return _merge(decided)


def _build_plan(instances: list[InstanceView], requests: list[RequestKV], cfg: RebalancerConfig) -> _Plan:
    by_id: dict[int, _Instance] = {}
    for view in instances:
        _validate_view(view)
        if view.instance_id in by_id:
            raise ValueError(f"duplicate InstanceView for instance {view.instance_id}")
        by_id[view.instance_id] = _Instance(view=replace(view), kv_tokens=0, avg_request_tokens=0.0,
                                            initial_free=view.num_free)
    plan = _Plan(instances=by_id)
    seen: set[str] = set()
    for r in requests:
        if r.request_id in seen:
            raise ValueError(f"duplicate RequestKV for request {r.request_id!r}")
        seen.add(r.request_id)
        if r.home not in by_id:
            raise ValueError(f"request {r.request_id!r} has home {r.home}, which has no InstanceView")
        for instance, tokens in r.tokens_by_instance.items():
            if instance not in by_id:
                raise ValueError(f"request {r.request_id!r} has KV on instance {instance}, which has no InstanceView")
            if tokens < 0:
                raise ValueError(f"request {r.request_id!r} has {tokens} KV tokens on instance {instance}")
            by_id[instance].kv_tokens += tokens
            if instance != r.home and tokens > 0:
                plan.links.add(frozenset((instance, r.home)))
        if r.num_full_blocks_at_home < 0:
            raise ValueError(f"request {r.request_id!r}: num_full_blocks_at_home must be >= 0")
        at_home = r.tokens_by_instance.get(r.home, 0)
        if r.num_full_blocks_at_home * cfg.block_size > at_home:
            raise ValueError(
                f"request {r.request_id!r}: {r.num_full_blocks_at_home} full blocks at home need "
                f"{r.num_full_blocks_at_home * cfg.block_size} tokens, but only {at_home} are there"
            )
        plan.requests.append(_Request(r.request_id, r.home, r.total_tokens, r.num_full_blocks_at_home))
    # Size of a request a debtor would admit: its own average, else the cluster's, else one block.
    known = [i.view.avg_request_tokens for i in by_id.values() if i.view.avg_request_tokens > 0]
    if known:
        fallback = sum(known) / len(known)
    elif plan.requests:
        fallback = sum(r.total_tokens for r in plan.requests) / len(plan.requests)
    else:
        fallback = 0.0
    for inst in by_id.values():
        inst.avg_request_tokens = inst.view.avg_request_tokens or fallback or float(cfg.block_size)
    return plan


def _validate_view(view: InstanceView) -> None:
    for name in ("num_blocks", "num_free", "lendable", "batch_size", "num_waiting_for_memory"):
        value = getattr(view, name)
        if value < 0:
            raise ValueError(f"InstanceView {view.instance_id}: {name} must be >= 0, got {value}")
    if view.num_free > view.num_blocks:
        raise ValueError(f"InstanceView {view.instance_id}: num_free {view.num_free} > num_blocks {view.num_blocks}")
    if view.lendable > view.num_free:
        raise ValueError(f"InstanceView {view.instance_id}: lendable {view.lendable} > num_free {view.num_free}")
    if not (math.isfinite(view.avg_request_tokens) and view.avg_request_tokens >= 0):
        raise ValueError(f"InstanceView {view.instance_id}: avg_request_tokens must be finite and >= 0")


# --------------------------------------------------------------------------- roles
def _is_debtor(inst: _Instance, cfg: RebalancerConfig) -> bool:
    v = inst.view
    if cfg.debtor_batch_threshold is not None and v.batch_size >= cfg.debtor_batch_threshold:
        return False
    return v.num_waiting_for_memory > 0 or v.num_free < cfg.low_free_fraction * v.num_blocks


def _is_creditor(inst: _Instance) -> bool:
    return inst.view.lendable > 0 and inst.view.num_waiting_for_memory == 0


def _longest_movable_request(plan: _Plan, debtor: int) -> Optional[_Request]:
    candidates = [r for r in plan.requests if r.home == debtor and r.movable_blocks > 0]
    if not candidates:
        return None
    # Longest first; equal lengths by request id so the choice is deterministic.
    return min(candidates, key=lambda r: (-r.total_tokens, r.request_id))


# --------------------------------------------------------------------------- evaluation
def _step_time(perf: PerfModel, batch_size: int, kv_tokens: int) -> float:
    return perf.decode_step_time(batch_size, max(0, kv_tokens))


def _group_throughput(batch: int, slowest_time: float) -> float:
    """Tokens/s of instances stepping together: their batches over the slowest step time."""
    if batch == 0:
        return 0.0
    if slowest_time <= 0:
        raise ValueError("the perf model predicts a zero step time; it cannot rank migrations")
    return batch / slowest_time


@dataclass
class _Snapshot:
    """Step times and lockstep groups of the current planning state."""

    time: dict[int, float]  # instance -> decode step time
    group_of: dict[int, int]  # instance -> smallest instance id of its group
    members: dict[int, list[int]]  # group -> instances

    @classmethod
    def of(cls, plan: _Plan, perf: PerfModel, cfg: RebalancerConfig) -> "_Snapshot":
        time = {i: _step_time(perf, inst.view.batch_size, inst.kv_tokens) for i, inst in plan.instances.items()}
        parent = {i: i for i in plan.instances}

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        if cfg.lockstep:
            for link in plan.links:
                a, b = sorted(link)
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
        group_of = {i: root(i) for i in plan.instances}
        members: dict[int, list[int]] = {}
        for i in sorted(plan.instances):
            members.setdefault(group_of[i], []).append(i)
        return cls(time=time, group_of=group_of, members=members)


def _admitted(debtor: _Instance, freed_tokens: int) -> int:
    """Waiting requests that `freed_tokens` (plus earlier leftovers) let into the batch."""
    available = debtor.pending_freed_tokens + freed_tokens
    return min(debtor.view.num_waiting_for_memory, int(available // debtor.avg_request_tokens))


def _candidate_sizes(perf: PerfModel, debtor: _Instance, creditor: _Instance, max_blocks: int,
                     block_size: int) -> list[int]:
    sizes = {max_blocks}
    power = 1
    while power < max_blocks:
        sizes.add(power)
        power *= 2
    # The smallest k that admits j waiting requests, for each j that fits in max_blocks.
    max_admissible = _admitted(debtor, max_blocks * block_size)
    step = max(1, math.ceil(max_admissible / _MAX_ADMISSION_CANDIDATES))
    admission_levels = sorted({0, max_admissible, *range(1, max_admissible + 1, step)})
    slope = perf.t_per_kv_token * block_size  # step time per moved block
    time_c = _step_time(perf, creditor.view.batch_size, creditor.kv_tokens)
    for j in admission_levels:
        if j > 0:
            needed = j * debtor.avg_request_tokens - debtor.pending_freed_tokens
            sizes.add(min(max_blocks, max(1, math.ceil(needed / block_size))))
        # With j admitted, T_d falls and T_c rises linearly in k; where they meet is the best
        # split for two instances in lockstep.
        if slope > 0:
            time_d = _step_time(perf, debtor.view.batch_size + j,
                                debtor.kv_tokens + round(j * debtor.avg_request_tokens))
            balance = (time_d - time_c) / (2 * slope)
            for k in (math.floor(balance), math.ceil(balance)):
                if 1 <= k <= max_blocks:
                    sizes.add(k)
    return sorted(sizes)


def _best_move(plan: _Plan, perf: PerfModel, cfg: RebalancerConfig) -> Optional[_Move]:
    """The qualifying move with the largest throughput gain, or None."""
    ordered = sorted(plan.instances.values(), key=lambda i: i.id)
    debtors = [i for i in ordered if i.id not in plan.receivers and _is_debtor(i, cfg)]
    debtor_ids = {i.id for i in debtors}
    creditors = [i for i in ordered
                 if i.id not in debtor_ids and i.id not in plan.senders and _is_creditor(i)]
    if not debtors or not creditors:
        return None
    snapshot = _Snapshot.of(plan, perf, cfg)
    best: Optional[_Move] = None
    for debtor in debtors:
        request = _longest_movable_request(plan, debtor.id)
        if request is None:
            continue
        for creditor in creditors:
            key = (debtor.id, creditor.id)
            state = _pair_state(plan, snapshot, debtor, creditor, request)
            cached = plan.pair_cache.get(key)
            if cached is not None and cached[0] == state:
                move = cached[1]
            else:
                move = _best_move_for_pair(plan, perf, cfg, snapshot, debtor, creditor, request)
                plan.pair_cache[key] = (state, move)
            # Strictly better only: earlier (lower id) pairs win ties.
            if move is not None and (best is None or move.delta > best.delta):
                best = move
    return best


def _pair_state(plan: _Plan, snapshot: _Snapshot, debtor: _Instance, creditor: _Instance,
                request: _Request) -> tuple:
    """Everything `_best_move_for_pair` reads, as a comparable value."""
    groups = sorted({snapshot.group_of[debtor.id], snapshot.group_of[creditor.id]})
    members = tuple(tuple(snapshot.members[g]) for g in groups)
    loads = tuple((i, plan.instances[i].view.batch_size, snapshot.time[i]) for g in members for i in g)
    d, c = debtor.view, creditor.view
    return (
        members, loads, request.request_id, request.movable_blocks,
        d.batch_size, d.num_waiting_for_memory, debtor.kv_tokens, debtor.pending_freed_tokens,
        c.batch_size, c.lendable, c.num_free, creditor.kv_tokens,
    )


def _best_move_for_pair(plan: _Plan, perf: PerfModel, cfg: RebalancerConfig, snapshot: _Snapshot,
                        debtor: _Instance, creditor: _Instance, request: _Request) -> Optional[_Move]:
    max_blocks = min(creditor.view.lendable, creditor.view.num_free, request.movable_blocks)
    if max_blocks <= 0:
        return None
    d, c = debtor.id, creditor.id
    # Throughput of the instances the move touches: the two groups, which the move joins.
    groups = sorted({snapshot.group_of[d], snapshot.group_of[c]})
    before = sum(
        _group_throughput(sum(plan.instances[i].view.batch_size for i in snapshot.members[g]),
                          max(snapshot.time[i] for i in snapshot.members[g]))
        for g in groups
    )
    others = [i for g in groups for i in snapshot.members[g] if i not in (d, c)]
    others_batch = sum(plan.instances[i].view.batch_size for i in others)
    others_time = max((snapshot.time[i] for i in others), default=0.0)
    batch_c = creditor.view.batch_size

    best: Optional[_Move] = None
    for k in _candidate_sizes(perf, debtor, creditor, max_blocks, cfg.block_size):
        moved = k * cfg.block_size
        admitted = _admitted(debtor, moved)
        batch_d = debtor.view.batch_size + admitted
        time_d = _step_time(perf, batch_d, debtor.kv_tokens - moved + round(admitted * debtor.avg_request_tokens))
        time_c = _step_time(perf, batch_c, creditor.kv_tokens + moved)
        if cfg.lockstep:
            after = _group_throughput(others_batch + batch_d + batch_c, max(others_time, time_d, time_c))
        else:
            after = _group_throughput(batch_d, time_d) + _group_throughput(batch_c, time_c)
        if before > 0:
            gain = after / before - 1.0
        else:
            gain = math.inf if after > 0 else 0.0
        if not gain > cfg.min_gain:
            continue
        # Sizes ascend, so a strict comparison keeps the smallest k among equal gains.
        delta = after - before
        if best is None or delta > best.delta:
            best = _Move(delta, gain, d, c, request.request_id, k, admitted)
    return best


def _apply(plan: _Plan, move: _Move, cfg: RebalancerConfig) -> None:
    debtor = plan.instances[move.debtor]
    creditor = plan.instances[move.creditor]
    moved = move.num_blocks * cfg.block_size
    request = next(r for r in plan.requests if r.request_id == move.request_id)
    request.movable_blocks -= move.num_blocks

    admitted_tokens = round(move.admitted * debtor.avg_request_tokens)
    # _admitted() never admits more than the freed tokens cover, so this stays >= 0.
    debtor.pending_freed_tokens = max(0, debtor.pending_freed_tokens + moved - admitted_tokens)
    debtor.kv_tokens = max(0, debtor.kv_tokens - moved + admitted_tokens)
    dv = debtor.view
    dv.batch_size += move.admitted
    dv.num_waiting_for_memory -= move.admitted
    dv.num_free = min(dv.num_blocks, debtor.initial_free + debtor.pending_freed_tokens // cfg.block_size)

    cv = creditor.view
    cv.num_free -= move.num_blocks
    cv.lendable = min(cv.lendable - move.num_blocks, cv.num_free)
    creditor.kv_tokens += moved

    plan.links.add(frozenset((debtor.id, creditor.id)))
    plan.senders.add(debtor.id)
    plan.receivers.add(creditor.id)


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
    "plan_migrations",
]
