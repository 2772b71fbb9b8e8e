"""The router: hands each new request to a home instance and collects its token stream.

Dispatch is least-loaded on the gManager's view (`control/dispatch.py`), over live instances
only. Outputs come back as `RequestUpdate` deltas; aborts go to the home by request id. A pump
thread keeps the view fresh and buffers updates, whether or not the front end is polling.

When the gManager announces an instance dead, the pump queues the `InstanceDown` in order with
the updates (so the front end has applied everything the instance reported before it) and drops
whatever that instance sends afterwards; the front end re-dispatches its requests.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from typing import Optional

from infinite_llm.control import messages as m
from infinite_llm.control.dispatch import Dispatcher
from infinite_llm.control.request import Request
from infinite_llm.transport.base import Endpoint, TransportClosed


class Router:
    def __init__(self, endpoint: Endpoint, num_instances: int, block_size: int, step_tokens: int) -> None:
        self.endpoint = endpoint
        self.num_instances = num_instances  # at start; `members` grows as instances join
        self.members: list[int] = list(range(num_instances))
        self.homes: dict[str, int] = {}
        self._lock = threading.Lock()  # the pump updates the view the caller's thread reads
        self._dispatcher = Dispatcher(num_instances, block_size, step_tokens)
        self.dead: set[int] = set()
        self._updates: queue.SimpleQueue[list[m.RequestUpdate] | m.InstanceDown] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, name="router", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the view
    def view(self) -> dict[int, m.InstanceStatus]:
        """instance -> its status as the gManager last reported it."""
        with self._lock:
            return dict(self._dispatcher.view)

    def live_instances(self) -> list[int]:
        with self._lock:
            return [i for i in self.members if i not in self.dead]

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the gManager reported every instance (the cluster can serve and lend)."""
        deadline = time.monotonic() + timeout_s
        while len(self.view()) < self.num_instances:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_instances)) - set(self.view()))
                raise TimeoutError(f"instances {missing} did not report within {timeout_s:.0f} s")
            time.sleep(0.005)

    # ------------------------------------------------------------------ requests
    def dispatch(self, request: Request, home: Optional[int] = None, resumed: bool = False) -> int:
        """Send a copy of the request (with the tokens generated so far, which its new home
        recomputes) to its home; the caller keeps its own object. Raises NoLiveInstanceError
        when every instance is dead, ValueError for a dead `home`."""
        with self._lock:
            if home is not None and home in self.dead:
                raise ValueError(f"instance {home} is dead")
            home = self._dispatcher.dispatch(request, home, exclude=self.dead)
        request = copy.copy(request)
        request.prompt_token_ids = list(request.prompt_token_ids)
        request.output_token_ids = list(request.output_token_ids)
        request.home = home
        self.homes[request.request_id] = home
        self.endpoint.send(home, m.AddRequest(request, resumed))
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

    def poll(self, timeout_s: Optional[float]) -> list[m.RequestUpdate | m.InstanceDown]:
        """Updates and instance deaths, in arrival order (waits up to `timeout_s` for the first)."""
        items: list[m.RequestUpdate | m.InstanceDown] = []
        try:
            got = self._updates.get(timeout=timeout_s) if timeout_s else self._updates.get_nowait()
            while True:
                if isinstance(got, list):
                    items.extend(got)
                else:
                    items.append(got)
                got = self._updates.get_nowait()
        except queue.Empty:
            pass
        for item in items:
            if isinstance(item, m.RequestUpdate) and item.finished and self.homes.get(item.request_id) == item.instance:
                self.homes.pop(item.request_id, None)
        return items

    def close(self) -> None:
        self.endpoint.close()
        self._thread.join(5)

    def _pump(self) -> None:
        while True:
            try:
                message = self.endpoint.recv(timeout=1.0)
            except TransportClosed:
                return
            if m.sender_of(message) in self.dead:
                continue  # fenced: a dead instance's late reports
            if isinstance(message, m.InstanceDown):
                with self._lock:
                    self.dead.add(message.instance)
                self._updates.put(message)
            elif isinstance(message, m.InstanceJoined):
                with self._lock:
                    if message.instance not in self.members:
                        self.members.append(message.instance)
                        self._dispatcher.add_instance(message.instance)
            elif isinstance(message, list):
                self._updates.put(message)
            elif isinstance(message, m.ClusterView):
                with self._lock:
                    self._dispatcher.update_view(message.statuses)
