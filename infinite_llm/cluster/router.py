"""The router: hands each new request to a home instance and collects its token stream.

Dispatch is least-loaded on the gManager's view (most free KV blocks, then fewest requests),
corrected for what the router sent since that view was reported, so a burst of arrivals
spreads out instead of landing on the instance that looked emptiest. Outputs come back as
`RequestUpdate` deltas; aborts go to the home by request id.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from infinite_llm.control import messages as m
from infinite_llm.control.request import Request
from infinite_llm.transport.base import Endpoint, TransportClosed


class Router:
    def __init__(self, endpoint: Endpoint, num_instances: int, block_size: int,
                 view: Callable[[], dict[int, tuple[int, int]]]) -> None:
        self.endpoint = endpoint
        self.num_instances = num_instances
        self.block_size = block_size
        self.view = view
        self.homes: dict[str, int] = {}
        # Blocks and requests dispatched per instance since the view last changed.
        self._sent: list[list[int]] = [[0, 0] for _ in range(num_instances)]
        self._last_view: dict[int, tuple[int, int]] = {}

    def choose_home(self, request: Request) -> int:
        view = self.view()
        if view != self._last_view:
            self._last_view = view
            self._sent = [[0, 0] for _ in range(self.num_instances)]

        def score(i: int) -> tuple[int, int, int]:
            free, load = view.get(i, (0, 0))
            return (free - self._sent[i][0], -(load + self._sent[i][1]), -i)

        return max(range(self.num_instances), key=score)

    def dispatch(self, request: Request, home: Optional[int] = None) -> int:
        """Send a copy of the request to its home (the caller keeps its own object)."""
        home = self.choose_home(request) if home is None else home
        request = copy.copy(request)
        request.prompt_token_ids = list(request.prompt_token_ids)
        request.output_token_ids = list(request.output_token_ids)
        request.home = home
        self.homes[request.request_id] = home
        self._sent[home][0] += -(-request.num_tokens // self.block_size)
        self._sent[home][1] += 1
        self.endpoint.send(home, m.AddRequest(request))
        return home

    def abort(self, request_id: str) -> None:
        home = self.homes.get(request_id)
        if home is not None:
            self.endpoint.send(home, m.AbortRequest(request_id))

    def order_migration(self, order: m.MigrationOrder) -> None:
        """Hand a migration order to the request's home (the gManager's path; tests and admin)."""
        home = self.homes.get(order.request_id)
        if home is None:
            raise ValueError(f"request {order.request_id!r} is not running")
        self.endpoint.send(home, order)

    def poll(self, timeout_s: Optional[float]) -> list[m.RequestUpdate]:
        """Updates that arrived (waits up to `timeout_s` for the first one)."""
        updates: list[m.RequestUpdate] = []
        wait = timeout_s
        while True:
            try:
                message = self.endpoint.recv(timeout=wait)
            except TransportClosed:
                return updates
            if message is None:
                return updates
            if isinstance(message, list):
                for update in message:
                    if update.finished:
                        self.homes.pop(update.request_id, None)
                updates.extend(message)
            wait = 0.0
