"""The router's dispatch rule, without its thread and transport (`cluster/router.py`).

Least loaded on the gManager's view: most free KV blocks, then fewest requests, then the lowest
id; corrected for what was dispatched to an instance since the view last changed for it, so a
burst of arrivals spreads out. `tests/sim` checks that this picks what `Router` picks.
"""

from __future__ import annotations

from infinite_llm.control.messages import InstanceStatus
from infinite_llm.control.request import Request


class SimRouter:
    def __init__(self, num_instances: int, block_size: int) -> None:
        self.num_instances = num_instances
        self.block_size = block_size
        self._view: dict[int, InstanceStatus] = {}
        self._sent = [[0, 0] for _ in range(num_instances)]  # blocks, requests since the view changed

    def update_view(self, statuses: dict[int, InstanceStatus]) -> None:
        """A `ClusterView` from the gManager arrived."""
        for i, status in statuses.items():
            if self._view.get(i) != status:  # it reported since: its count includes ours
                self._sent[i] = [0, 0]
        self._view = dict(statuses)

    def choose_home(self, request: Request) -> int:
        def score(i: int) -> tuple[int, int, int]:
            status = self._view.get(i)
            free = status.num_free if status else 0
            load = status.load.batch_size + status.load.num_waiting if status else 0
            return (free - self._sent[i][0], -(load + self._sent[i][1]), -i)

        return max(range(self.num_instances), key=score)

    def dispatch(self, request: Request) -> int:
        home = self.choose_home(request)
        self._sent[home][0] += -(-request.num_tokens // self.block_size)
        self._sent[home][1] += 1
        return home


__all__ = ["SimRouter"]
