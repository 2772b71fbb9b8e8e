"""DistAttention on independent instances: ship / serve / return / merge.

Home side (`StepAttention`, the model's attention backend for one step of one instance): per
layer it writes its tokens' K/V into its own blocks, ships each holder of remote blocks one
`AttnQuery` (the queries of the requests with blocks there, plus the new tokens' K/V whose slots
are there), computes the local MicroAttention meanwhile, then merges the holders' `AttnPartial`s
with ScaleReduce.

Holder side (`GuestAttention`): serves an `AttnQuery` at once on the holder's message pump,
whatever the holder's own loop is doing, so a home never waits for a holder's step and two
instances that borrow from each other cannot deadlock. The holder finds the guest's blocks in its
rManager's guest index; the message names only the request and the query positions.

Everything that does not change between layers (slots, block tables, which rows go where) is
built once per step (`StepLayout` on the home, a per-step cache on the holder).
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from infinite_llm.control.messages import AttnPartial, AttnQuery, GuestSeq
from infinite_llm.control.plan import BlockRef, SeqWork
from infinite_llm.control.rmanager import RManager
from infinite_llm.instance.kv_cache import PagedKVCache
from infinite_llm.kernels.dist_attention import (
    BlockIndex, MicroAttentionPlan, merge_partials, micro_attention, plan_micro_attention, run_micro_attention_plan,
)


class RemoteAttentionError(RuntimeError):
    """A holder did not answer (or answered with an error) for this step's attention."""


@dataclass
class SegmentTables:
    """MicroAttention's index for a list of (query rows, KV blocks) segments."""

    index: BlockIndex
    # The CPU kernel's index work for these tables, made at the step's first layer and reused
    # by the others (it was redone per layer: 60-80% of a small decode step's attention time).
    plan: Optional[MicroAttentionPlan] = None


def build_segments(segments: list[tuple[int, int, Sequence[int], Sequence[int]]], block_size: int,
                   device: torch.device) -> Optional[SegmentTables]:
    """segments: (start_pos, num_queries, block ids, their table positions), visible up to
    start_pos + num_queries. Built with numpy: per-element Python here ran every step over
    every block of the batch (a 4K-token decode: 50 us of 4 ms)."""
    if not segments:
        return None
    n = len(segments)
    counts = np.fromiter((len(blocks) for _, _, blocks, _ in segments), dtype=np.int64, count=n)
    total = int(counts.sum())
    blocks = np.fromiter(chain.from_iterable(b for _, _, b, _ in segments), dtype=np.int64, count=total)
    key_starts = block_size * np.fromiter(chain.from_iterable(p for _, _, _, p in segments), dtype=np.int64,
                                          count=total)
    first = np.fromiter((start for start, _, _, _ in segments), dtype=np.int64, count=n)
    num_q = np.fromiter((q for _, q, _, _ in segments), dtype=np.int64, count=n)
    row = np.repeat(np.arange(n), counts)  # each listed block's segment and column
    col = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    tables, starts, lens = (np.zeros((n, int(counts.max())), dtype=np.int64) for _ in range(3))
    tables[row, col] = blocks
    starts[row, col] = key_starts
    lens[row, col] = np.minimum(block_size, (first + num_q)[row] - key_starts)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(num_q, out=cu[1:])
    q_positions = np.arange(int(cu[-1])) + np.repeat(first - cu[:-1], num_q)
    as_long = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    return SegmentTables(BlockIndex(as_long(cu), as_long(q_positions), as_long(tables), as_long(starts), as_long(lens)))


def run_micro_attention(q: torch.Tensor, cache: PagedKVCache, layer: int,
                        seg: SegmentTables) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = cache.k[layer], cache.v[layer]
    if q.is_cuda:  # the Triton kernel reads the tables itself
        return micro_attention(q, k, v, seg.index)
    if seg.plan is None:
        seg.plan = plan_micro_attention(q, k, v, seg.index)
    return run_micro_attention_plan(seg.plan, q, k, v)


# --------------------------------------------------------------------------- home side
@dataclass
class RemotePart:
    """What one holder gets every layer of this step."""

    seqs: list[GuestSeq]
    q_rows: torch.Tensor  # rows of the step's tokens whose queries go there
    kv_rows: torch.Tensor  # rows whose new K/V is stored there


@dataclass
class StepLayout:
    num_tokens: int
    local_write_rows: torch.Tensor
    local_write_slots: torch.Tensor
    local_rows: torch.Tensor  # rows of sequences with blocks here
    local: Optional[SegmentTables]
    remote: dict[int, RemotePart] = field(default_factory=dict)

    @property
    def all_local(self) -> bool:
        return not self.remote and self.local_rows.numel() == self.num_tokens


def build_step_layout(batch: list[SeqWork], rank: int, block_size: int, device: torch.device) -> StepLayout:
    write_rows, write_slots, local_rows, segments = [], [], [], []
    remote: dict[int, tuple[list[GuestSeq], list[int], list[int]]] = {}
    row = 0
    for work in batch:
        n = len(work.token_ids)
        by_holder = _indices_by_holder(work.block_table[:-(-work.end_pos // block_size)])
        for j in range(n):
            pos = work.start_pos + j
            ref = work.block_table[pos // block_size]
            if ref.instance == rank:
                write_rows.append(row + j)
                write_slots.append(ref.block * block_size + pos % block_size)
        for holder, indices in by_holder.items():
            if holder == rank:
                local_rows.extend(range(row, row + n))
                segments.append((work.start_pos, n, [work.block_table[i].block for i in indices], indices))
                continue
            offsets = [j for j in range(n)
                       if work.block_table[(work.start_pos + j) // block_size].instance == holder]
            seqs, q_rows, kv_rows = remote.setdefault(holder, ([], [], []))
            seqs.append(GuestSeq(work.request_id, work.start_pos, n, offsets))
            q_rows.extend(range(row, row + n))
            kv_rows.extend(row + j for j in offsets)
        row += n
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return StepLayout(
        num_tokens=row, local_write_rows=as_long(write_rows), local_write_slots=as_long(write_slots),
        local_rows=as_long(local_rows), local=build_segments(segments, block_size, device),
        remote={h: RemotePart(s, as_long(q), as_long(kv)) for h, (s, q, kv) in sorted(remote.items())},
    )


def _indices_by_holder(refs: list[BlockRef]) -> dict[int, list[int]]:
    """Table positions of the visible blocks, per instance holding them."""
    instances = [ref.instance for ref in refs]
    if instances.count(instances[0]) == len(instances):  # all on one instance: most requests
        return {instances[0]: list(range(len(refs)))}
    by_holder: dict[int, list[int]] = {}
    for index, instance in enumerate(instances):
        by_holder.setdefault(instance, []).append(index)
    return by_holder


class PeerLost(RuntimeError):
    """A holder this step waits on was declared dead: the step is retried after recovery."""

    def __init__(self, instance: int) -> None:
        super().__init__(f"instance {instance} was declared dead")
        self.instance = instance


class StepInterrupted(RuntimeError):
    """The step was called off between layers (a request arrived during a prompt running alone):
    nothing of it is committed, and the scheduler runs those tokens again."""

    def __init__(self, at_layer: float) -> None:
        super().__init__(f"step called off at layer {at_layer}")
        self.at_layer = at_layer


class PartialMailbox:
    """Where the message pump drops `AttnPartial`s for the step thread waiting on them.

    A wait ticks `on_wait` about every 0.1 s (waiting on a peer is not a wedged loop) and ends
    with `PeerLost` as soon as the holder is declared dead.
    """

    def __init__(self, on_wait: Callable[[], None] = lambda: None) -> None:
        self._cond = threading.Condition()
        self._partials: dict[tuple[int, int, int], AttnPartial] = {}
        self._lost: set[int] = set()
        self._closed = False
        self._done_below = 0  # steps before this one have ended: their late partials are dropped
        self.on_wait = on_wait

    def put(self, partial: AttnPartial) -> None:
        with self._cond:
            if partial.holder in self._lost or partial.step < self._done_below:
                return
            self._partials[(partial.step, partial.layer, partial.holder)] = partial
            self._cond.notify_all()

    def lose(self, holder: int) -> None:
        """`holder` is dead: its partials will never come."""
        with self._cond:
            self._lost.add(holder)
            self._cond.notify_all()

    def close(self) -> None:
        """The instance stops: no wait may outlive it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, step: int, layer: int, holder: int, timeout_s: float) -> AttnPartial:
        key = (step, layer, holder)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._partials:
                if holder in self._lost:
                    raise PeerLost(holder)
                if self._closed:
                    raise RemoteAttentionError("the instance is stopping")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteAttentionError(
                        f"instance {holder} did not answer layer {layer} of step {step} within {timeout_s:.0f} s"
                    )
                self._cond.wait(min(left, 0.1))
                self.on_wait()
            return self._partials.pop(key)

    def drop_step(self, step: int) -> None:
        """`step` has ended (steps end in order); a partial for it or an earlier one is stale."""
        with self._cond:
            self._done_below = max(self._done_below, step + 1)
            for key in [k for k in self._partials if k[0] == step]:
                del self._partials[key]


class StepAttention:
    """The model's attention backend for one step of one home instance."""

    def __init__(self, rank: int, step: int, layout: StepLayout, cache: PagedKVCache,
                 send: Callable[[int, object], None], mailbox: PartialMailbox,
                 num_heads: int, head_dim: int, timeout_s: float,
                 called_off: Optional[Callable[[float], bool]] = None) -> None:
        self.rank, self.step, self.layout, self.cache = rank, step, layout, cache
        self.send, self.mailbox, self.timeout_s = send, mailbox, timeout_s
        self.hq, self.d = num_heads, head_dim
        # Asked with the layers done so far, before and after each layer's attention (about
        # halfway through the layer): True ends the step there.
        self.called_off = called_off

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._go_on(layer)
        out = self._attend(layer, q, k, v)
        self._go_on(layer + 0.5)
        return out

    def _go_on(self, layers_done: float) -> None:
        if self.called_off is not None and self.called_off(layers_done):
            raise StepInterrupted(layers_done)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        self.cache.write(layer, layout.local_write_slots, self._take(k, layout.local_write_rows),
                         self._take(v, layout.local_write_rows))
        self._ship(layer, q, k, v)
        local = None
        if layout.local is not None:
            local = run_micro_attention(self._take(q, layout.local_rows), self.cache, layer, layout.local)
        if layout.all_local:
            assert local is not None
            return local[0].to(q.dtype)
        outs, lses = [], []
        if local is not None:
            out, lse = self._scatter(layout.local_rows, *local)
            outs.append(out)
            lses.append(lse)
        for holder, part in layout.remote.items():
            partial = self.mailbox.take(self.step, layer, holder, self.timeout_s)
            if partial.error is not None:
                raise RemoteAttentionError(f"instance {holder}: {partial.error}")
            out, lse = self._scatter(part.q_rows, partial.out.to(q.device), partial.lse.to(q.device))
            outs.append(out)
            lses.append(lse)
        merged, _ = merge_partials(outs, lses)
        return merged.to(q.dtype)

    def _ship(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for holder, part in self.layout.remote.items():
            # All rows (a lone split request): the step's own tensors, no copy. Nothing writes
            # them after this; in process the holder reads them, across processes they are sent.
            self.send(holder, AttnQuery(
                home=self.rank, step=self.step, layer=layer, seqs=part.seqs,
                q=self._take(q, part.q_rows), k=self._take(k, part.kv_rows), v=self._take(v, part.kv_rows),
            ))

    def _take(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x[rows]; row lists are ascending and distinct, so one as long as the step is all its
        rows in order: then x itself (no copy; a single-instance step always takes this path).
        No rows (a decode token's K/V stays home): an empty slice, cheaper than an index."""
        n = rows.numel()
        return x if n == self.layout.num_tokens else x[:0] if n == 0 else x[rows]

    def _scatter(self, rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A partial over all the step's rows: 0 / -inf where it has nothing (ScaleReduce
        then ignores it there)."""
        if rows.numel() == self.layout.num_tokens:  # all rows, in order (see _take)
            return out, lse
        full_out = torch.zeros(self.layout.num_tokens, self.hq, self.d, dtype=torch.float32, device=out.device)
        full_lse = torch.full((self.layout.num_tokens, self.hq), float("-inf"), dtype=torch.float32, device=out.device)
        full_out[rows] = out.float()
        full_lse[rows] = lse.float()
        return full_out, full_lse


# --------------------------------------------------------------------------- holder side
# In process, a query whose MicroAttention here reads at most this much K/V (one layer) is
# served on its home's thread; a larger one on this holder's pump, in parallel with the home's
# own share. The pump costs two thread wake-ups and the GIL handed back and forth, about 250 us
# per layer on 2 cores: more than the overlap saves below a few MB (a 2K-token share of the
# default model is 2 MB, read in about 0.1 ms).
INLINE_MAX_KV_BYTES = 4 << 20


@dataclass
class _GuestStep:
    seg: Optional[SegmentTables]
    write_slots: torch.Tensor
    rows: torch.Tensor  # the query rows of sequences with blocks here (ascending)
    num_rows: int  # all the query rows of the message
    kv_bytes: int  # K and V of one layer that the MicroAttention here reads


class GuestAttention:
    """Serves other instances' queries over the blocks this instance lent them."""

    def __init__(self, rank: int, rmanager: RManager, lock, cache: PagedKVCache, device: torch.device) -> None:
        self.rank, self.rm, self.lock, self.cache, self.device = rank, rmanager, lock, cache, device
        self._steps: dict[int, tuple[int, _GuestStep]] = {}  # home -> (step, its layout)
        self._count_lock = threading.Lock()  # homes' threads serve here at once (in process)
        k = cache.k[0]
        self._slot_bytes = 2 * k[0, 0].numel() * k.element_size()  # K and V of one token, one layer
        self.num_served = 0

    def serve(self, query: AttnQuery) -> AttnPartial:
        if not torch.is_inference_mode_enabled():  # on a pump (a home's step thread already is)
            with torch.inference_mode():
                return self.serve(query)
        try:
            layout = self._layout(query)
            if layout.write_slots.numel():
                self.cache.write(query.layer, layout.write_slots, query.k.to(self.device), query.v.to(self.device))
            out, lse = self._attend(query, layout)
            with self._count_lock:
                self.num_served += 1
            return AttnPartial(self.rank, query.step, query.layer, out, lse)
        except Exception as exc:  # noqa: BLE001 - the home fails its step, not this instance
            return AttnPartial(self.rank, query.step, query.layer, None, None, error=f"{type(exc).__name__}: {exc}")

    def serves_inline(self, query: AttnQuery) -> bool:
        """Whether `query` is small enough to serve on its sender's thread (see
        INLINE_MAX_KV_BYTES). A query this instance cannot lay out is (its error reply is quick)."""
        try:
            return self._layout(query).kv_bytes <= INLINE_MAX_KV_BYTES
        except Exception:  # noqa: BLE001 - serve() answers it with the error
            return True

    def _attend(self, query: AttnQuery, layout: _GuestStep) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) on the CPU for every query row: 0 / -inf for rows with no block here."""
        q = query.q.to(self.device)
        if layout.seg is not None and layout.rows.numel() == layout.num_rows:  # every row: no scatter
            o, l = run_micro_attention(q, self.cache, query.layer, layout.seg)
            return o.float().cpu(), l.float().cpu()
        hq, d = query.q.shape[1], query.q.shape[2]
        out = torch.zeros(layout.num_rows, hq, d, dtype=torch.float32)
        lse = torch.full((layout.num_rows, hq), float("-inf"), dtype=torch.float32)
        if layout.seg is not None:
            o, l = run_micro_attention(q[layout.rows.to(self.device)], self.cache, query.layer, layout.seg)
            out[layout.rows] = o.float().cpu()
            lse[layout.rows] = l.float().cpu()
        return out, lse

    def _layout(self, query: AttnQuery) -> _GuestStep:
        cached = self._steps.get(query.home)
        if cached is not None and cached[0] == query.step:
            return cached[1]
        bs = self.cache.block_size
        segments, slots, has_blocks = [], [], []
        keys = 0
        with self.lock:
            tables = {s.request_id: self.rm.guest_blocks(s.request_id) for s in query.seqs}
        for s in query.seqs:
            table = tables[s.request_id]  # (position, block), by position
            if s.write_offsets:
                index = dict(table)
                for j in s.write_offsets:
                    pos = s.start_pos + j
                    if pos // bs not in index:
                        raise RuntimeError(f"request {s.request_id!r}: no block here for position {pos}")
                    slots.append(index[pos // bs] * bs + pos % bs)
            visible = table[:bisect.bisect_left(table, (-(-s.end_pos // bs),))]  # blocks before end_pos
            has_blocks.append(bool(visible))
            if visible:
                positions, blocks = zip(*visible)
                segments.append((s.start_pos, s.num_queries, blocks, positions))
                # Every visible block is full but the last (it may hold end_pos - 1).
                keys += bs * len(visible) - max(0, (positions[-1] + 1) * bs - s.end_pos)
        layout = _GuestStep(build_segments(segments, bs, self.device),
                            torch.tensor(slots, dtype=torch.long, device=self.device),
                            self._rows(query.seqs, has_blocks), sum(s.num_queries for s in query.seqs),
                            keys * self._slot_bytes)
        self._steps[query.home] = (query.step, layout)
        return layout

    @staticmethod
    def _rows(seqs: list[GuestSeq], has_blocks: list[bool]) -> torch.Tensor:
        rows, row = [], 0
        for s, has in zip(seqs, has_blocks):
            if has:
                rows.extend(range(row, row + s.num_queries))
            row += s.num_queries
        return torch.tensor(rows, dtype=torch.long)
