"""The router's dispatch rule (pure Python; the real router and the simulator share it).

Least loaded on the gManager's view, in this order:
1. the request's prompt fits the instance's free KV blocks, less those its waiting requests will
   take (else it would wait for memory there behind them, and the instance would take back blocks
   it lent, preempting a long request);
2. the fewest steps of prompt work queued (a long prompt being prefilled makes its home slow for
   a newcomer: it shares every step with the prompt's chunks, and the prompt's chunks shrink to
   keep the newcomer's tokens flowing, so both lose); counted in whole steps of the instance's
   token budget, so that a few short prompts do not outweigh memory;
3. the most free KV blocks (less the waiting requests' again), then the fewest requests, then the
   lowest id.
Each is corrected for the requests dispatched to an instance that its last report did not count
yet, so a burst of arrivals spreads out instead of landing on the instance that looked emptiest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Collection, Optional

from infinite_llm.control.messages import InstanceStatus
from infinite_llm.control.request import Request


class NoLiveInstanceError(RuntimeError):
    """Every instance of the cluster is dead."""


@dataclass
class _Sent:
    """A request dispatched to an instance whose reports do not count it yet."""

    seq: int  # the instance's n-th request from this router (1-based)
    blocks: int
    tokens: int


class Dispatcher:
    def __init__(self, num_instances: int, block_size: int, step_tokens: int) -> None:
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        self.members: list[int] = list(range(num_instances))
        self.block_size = block_size
        self.step_tokens = step_tokens  # an instance's per-step token budget
        self.view: dict[int, InstanceStatus] = {}
        self._num_sent = {i: 0 for i in self.members}
        self._unreported: dict[int, deque[_Sent]] = {i: deque() for i in self.members}

    def add_instance(self, instance_id: int) -> None:
        if instance_id not in self._num_sent:
            self.members.append(instance_id)
            self._num_sent[instance_id] = 0
            self._unreported[instance_id] = deque()

    def update_view(self, statuses: dict[int, InstanceStatus]) -> None:
        """A `ClusterView` from the gManager arrived. An instance's report counts the requests
        it had taken in when it was made (`num_received`), not necessarily all that were sent."""
        for i, status in statuses.items():
            pending = self._unreported.get(i)
            while pending and pending[0].seq <= status.load.num_received:
                pending.popleft()
        self.view = dict(statuses)

    def choose_home(self, exclude: Collection[int] = (), blocks_needed: int = 0) -> int:
        """The least-loaded instance that is neither excluded nor reported dead, for a request
        whose prompt takes `blocks_needed` KV blocks."""
        def score(i: int) -> tuple[bool, int, int, int, int]:
            status, pending = self.view.get(i), self._unreported[i]
            free = (self._usable_blocks(status) if status else 0) - sum(p.blocks for p in pending)
            load = (status.load.batch_size + status.load.num_waiting if status else 0) + len(pending)
            backlog = (status.load.prefill_backlog_tokens if status else 0) + sum(p.tokens for p in pending)
            return (free >= blocks_needed, -(backlog // self.step_tokens), free, -load, -i)

        live = [i for i in self.members
                if i not in exclude and not (i in self.view and self.view[i].state == "dead")]
        if not live:
            raise NoLiveInstanceError("no instance is alive to serve the request")
        return max(live, key=score)

    def _usable_blocks(self, status: InstanceStatus) -> int:
        """Free blocks less those the instance's waiting requests will take: an instance whose
        head waits for blocks it lent out has free blocks a newcomer cannot use before it."""
        queued = -(-status.load.waiting_tokens // self.block_size)  # rounded up
        return status.num_free - queued

    def dispatch(self, request: Request, home: Optional[int] = None, exclude: Collection[int] = ()) -> int:
        """The request's home (the least-loaded live one unless given), counted as sent there."""
        blocks = -(-request.num_tokens // self.block_size)
        home = self.choose_home(exclude, blocks) if home is None else home
        self._num_sent[home] += 1
        self._unreported[home].append(_Sent(self._num_sent[home], blocks, request.num_tokens))
        return home
