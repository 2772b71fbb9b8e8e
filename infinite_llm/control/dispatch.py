"""The router's dispatch rule (pure Python; the real router and the simulator share it).

Least loaded on the gManager's view, in this order:
1. the request's prompt fits the instance's free KV blocks (else it would wait for memory there,
   and the instance would take back blocks it lent, preempting a long request);
2. the fewest steps of prompt work queued (a long prompt being prefilled makes its home slow for
   a newcomer: it shares every step with the prompt's chunks, and the prompt's chunks shrink to
   keep the newcomer's tokens flowing, so both lose); counted in whole steps of the instance's
   token budget, so that a few short prompts do not outweigh memory;
3. the most free KV blocks, then the fewest requests, then the lowest id.
Each is corrected for what was dispatched to an instance since the view last changed for it, so
a burst of arrivals spreads out instead of landing on the instance that looked emptiest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional

from infinite_llm.control.messages import InstanceStatus
from infinite_llm.control.request import Request


class NoLiveInstanceError(RuntimeError):
    """Every instance of the cluster is dead."""


@dataclass
class _Sent:
    """Dispatched to an instance since the view last changed for it."""

    blocks: int = 0
    requests: int = 0
    tokens: int = 0


class Dispatcher:
    def __init__(self, num_instances: int, block_size: int, step_tokens: int) -> None:
        if step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        self.members: list[int] = list(range(num_instances))
        self.block_size = block_size
        self.step_tokens = step_tokens  # an instance's per-step token budget
        self.view: dict[int, InstanceStatus] = {}
        self._sent = {i: _Sent() for i in self.members}

    def add_instance(self, instance_id: int) -> None:
        if instance_id not in self._sent:
            self.members.append(instance_id)
            self._sent[instance_id] = _Sent()

    def update_view(self, statuses: dict[int, InstanceStatus]) -> None:
        """A `ClusterView` from the gManager arrived."""
        for i, status in statuses.items():
            if i in self._sent and self.view.get(i) != status:  # it reported since: its count includes ours
                self._sent[i] = _Sent()
        self.view = dict(statuses)

    def choose_home(self, exclude: Collection[int] = (), blocks_needed: int = 0) -> int:
        """The least-loaded instance that is neither excluded nor reported dead, for a request
        whose prompt takes `blocks_needed` KV blocks."""
        def score(i: int) -> tuple[bool, int, int, int, int]:
            status, sent = self.view.get(i), self._sent[i]
            free = (status.num_free if status else 0) - sent.blocks
            load = (status.load.batch_size + status.load.num_waiting if status else 0) + sent.requests
            backlog = (status.load.prefill_backlog_tokens if status else 0) + sent.tokens
            return (free >= blocks_needed, -(backlog // self.step_tokens), free, -load, -i)

        live = [i for i in self.members
                if i not in exclude and not (i in self.view and self.view[i].state == "dead")]
        if not live:
            raise NoLiveInstanceError("no instance is alive to serve the request")
        return max(live, key=score)

    def dispatch(self, request: Request, home: Optional[int] = None, exclude: Collection[int] = ()) -> int:
        """The request's home (the least-loaded live one unless given), counted as sent there."""
        blocks = -(-request.num_tokens // self.block_size)
        home = self.choose_home(exclude, blocks) if home is None else home
        sent = self._sent[home]
        sent.blocks += blocks
        sent.requests += 1
        sent.tokens += request.num_tokens
        return home
