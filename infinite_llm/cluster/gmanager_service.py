"""The gManager as a service: its own thread and mailbox (heartbeats in, answers and orders out)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from infinite_llm.control import messages as m
from infinite_llm.control.gmanager import GManager
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.rebalancer import RebalancerConfig
from infinite_llm.transport.base import Endpoint, TransportClosed

logger = logging.getLogger(__name__)


class GManagerService:
    def __init__(self, endpoint: Endpoint, num_instances: int, perf: PerfModel, block_size: int,
                 rebalance: bool, rebalance_interval_s: float, heartbeat_timeout_s: float = 10.0,
                 copy_s_per_block: float = 0.0) -> None:
        self.endpoint = endpoint
        self.gm = GManager(num_instances, heartbeat_timeout_s)
        self.perf = perf
        # A move's gain counts until the next plan, which may undo or extend it.
        self.rebalancer_config = RebalancerConfig(block_size=block_size, copy_s_per_block=copy_s_per_block,
                                                  horizon_s=rebalance_interval_s)
        self.rebalance = rebalance and num_instances > 1
        self.rebalance_interval_s = rebalance_interval_s
        self.lock = threading.Lock()  # the router reads the view from its own thread
        self.num_orders_sent = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gmanager", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.endpoint.close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every instance has reported once (the cluster can serve and lend)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                missing = [i for i in range(self.gm.num_instances) if self.gm.status(i) is None]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"instances {missing} did not report within {timeout_s:.0f} s")
            time.sleep(0.005)

    def free_blocks(self) -> dict[int, tuple[int, int]]:
        """instance -> (free blocks, batch size) as last reported (for the router's dispatch)."""
        with self.lock:
            return {
                i: (s.num_free, s.load.batch_size + s.load.num_waiting)
                for i in range(self.gm.num_instances) if (s := self.gm.status(i)) is not None
            }

    def _run(self) -> None:
        next_plan = time.monotonic() + self.rebalance_interval_s
        while not self._stop.is_set():
            timeout = max(0.0, next_plan - time.monotonic()) if self.rebalance else 0.5
            try:
                message = self.endpoint.recv(timeout=timeout)
            except TransportClosed:
                return
            try:
                if message is not None:
                    self._handle(message)
                if self.rebalance and time.monotonic() >= next_plan:
                    self._send_orders()
                    next_plan = time.monotonic() + self.rebalance_interval_s
            except Exception:  # noqa: BLE001 - the gManager outlives a bad message
                logger.exception("gManager: handling %r failed", type(message).__name__)

    def _handle(self, message: object) -> None:
        if isinstance(message, m.Heartbeat):
            with self.lock:
                self.gm.heartbeat(message, time.monotonic())
        elif isinstance(message, m.CreditorQuery):
            with self.lock:
                candidates = self.gm.candidate_creditors(message.instance, message.num_blocks, time.monotonic())
            self.endpoint.send(message.instance, m.CreditorReply(message.tag, candidates))
        elif isinstance(message, m.Stop):
            self._stop.set()

    def _send_orders(self) -> None:
        with self.lock:
            orders = self.gm.plan_migrations(self.perf, self.rebalancer_config)
        for order in orders:
            home = self.gm.home_of(order.request_id)
            if home is not None:
                self.endpoint.send(home, order)
                self.num_orders_sent += 1
