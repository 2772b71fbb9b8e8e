"""The router's dispatch rule (pure Python; the real router and the simulator share it).

Least loaded on the gManager's view: most free KV blocks, then fewest requests, then the lowest
id; corrected for what was dispatched to an instance since the view last changed for it, so a
burst of arrivals spreads out instead of landing on the instance that looked emptiest.
"""

from __future__ import annotations

from typing import Collection, Optional

from infinite_llm.control.messages import InstanceStatus
from infinite_llm.control.request import Request


class NoLiveInstanceError(RuntimeError):
    """Every instance of the cluster is dead."""


class Dispatcher:
    def __init__(self, num_instances: int, block_size: int) -> None:
        self.members: list[int] = list(range(num_instances))
        self.block_size = block_size
        self.view: dict[int, InstanceStatus] = {}
        self._sent = {i: [0, 0] for i in self.members}  # blocks, requests since the view changed

    def add_instance(self, instance_id: int) -> None:
        if instance_id not in self._sent:
            self.members.append(instance_id)
            self._sent[instance_id] = [0, 0]

    def update_view(self, statuses: dict[int, InstanceStatus]) -> None:
        """A `ClusterView` from the gManager arrived."""
        for i, status in statuses.items():
            if i in self._sent and self.view.get(i) != status:  # it reported since: its count includes ours
                self._sent[i] = [0, 0]
        self.view = dict(statuses)

    def choose_home(self, exclude: Collection[int] = ()) -> int:
        """The least-loaded instance that is neither excluded nor reported dead."""
        def score(i: int) -> tuple[int, int, int]:
            status = self.view.get(i)
            free = status.num_free if status else 0
            load = status.load.batch_size + status.load.num_waiting if status else 0
            return (free - self._sent[i][0], -(load + self._sent[i][1]), -i)

        live = [i for i in self.members
                if i not in exclude and not (i in self.view and self.view[i].state == "dead")]
        if not live:
            raise NoLiveInstanceError("no instance is alive to serve the request")
        return max(live, key=score)

    def dispatch(self, request: Request, home: Optional[int] = None, exclude: Collection[int] = ()) -> int:
        """The request's home (the least-loaded live one unless given), counted as sent there."""
        home = self.choose_home(exclude) if home is None else home
        self._sent[home][0] += -(-request.num_tokens // self.block_size)
        self._sent[home][1] += 1
        return home
