"""The gManager as a service: its own thread and mailbox (heartbeats in; creditor answers,
migration orders and the cluster view for the router out). It runs in the driver process
(embedded default) or as a Ray actor; either way it is reached only by messages.

On every view period it also checks liveness; an instance it declares dead is announced to
every instance and the router with `InstanceDown` (see `control/gmanager.py` for the rules).
"""

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
                 rebalance: bool, rebalance_interval_s: float, view_interval_s: float = 0.05,
                 heartbeat_timeout_s: float = 5.0, copy_s_per_block: float = 0.0,
                 cross_host_copy_factor: float = 1.0) -> None:
        self.endpoint = endpoint
        self.gm = GManager(num_instances, heartbeat_timeout_s)
        self.perf = perf
        # A move's gain counts until the next plan, which may undo or extend it.
        self.rebalancer_config = RebalancerConfig(block_size=block_size, copy_s_per_block=copy_s_per_block,
                                                  cross_host_copy_factor=cross_host_copy_factor,
                                                  horizon_s=rebalance_interval_s)
        self.rebalance = rebalance
        self.rebalance_interval_s = rebalance_interval_s
        self.view_interval_s = view_interval_s
        self.num_orders_sent = 0
        self.failures: list[tuple[int, str, float]] = []  # (instance, reason, when declared dead)
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

    def _run(self) -> None:
        now = time.monotonic()
        next_plan, next_view = now + self.rebalance_interval_s, now
        while not self._stop.is_set():
            due = min(next_plan, next_view) if self.rebalance else next_view
            try:
                message = self.endpoint.recv(timeout=max(0.0, due - time.monotonic()))
            except TransportClosed:
                return
            try:
                if message is not None:
                    self._handle(message)
                now = time.monotonic()
                if now >= next_view:
                    for instance, reason in self.gm.check_liveness(now):
                        self._announce_down(instance, reason)
                    self._send_view()
                    next_view = now + self.view_interval_s
                if self.rebalance and now >= next_plan:
                    self._send_orders()
                    next_plan = now + self.rebalance_interval_s
            except TransportClosed:
                return
            except Exception:  # noqa: BLE001 - the gManager outlives a bad message
                logger.exception("gManager: handling %r failed", type(message).__name__)

    def _handle(self, message: object) -> None:
        if isinstance(message, m.Heartbeat):
            if message.instance in self.gm.dead:  # a wedged instance resumed: it must stop
                self.endpoint.send(message.instance, m.InstanceDown(message.instance, self.gm.dead[message.instance]))
                return
            self.gm.heartbeat(message, time.monotonic())
        elif isinstance(message, (m.InstanceFailed, m.RemoveInstance)):
            if self.gm.declare_dead(message.instance, message.reason):
                self._announce_down(message.instance, message.reason)
        elif isinstance(message, m.InstanceJoined):
            self._admit_member(message.instance)
        elif isinstance(message, m.CreditorQuery):
            candidates = self.gm.candidate_creditors(message.instance, message.num_blocks, time.monotonic())
            self.endpoint.send(message.instance, m.CreditorReply(message.tag, candidates))
        elif isinstance(message, m.Stop):
            self._stop.set()

    def _admit_member(self, instance: int) -> None:
        self.gm.add_instance(instance)
        for dead, reason in self.gm.dead.items():  # the newcomer must not wait on any of them
            self._send(instance, m.InstanceDown(dead, reason))
        for peer in [m.ROUTER, *self.gm.live_members()]:
            self._send(peer, m.InstanceJoined(instance))

    def _announce_down(self, instance: int, reason: str) -> None:
        """Tell everyone (the dead instance too, in case it was only wedged)."""
        logger.warning("gManager: instance %d declared dead: %s", instance, reason)
        self.failures.append((instance, reason, time.monotonic()))
        for peer in [m.ROUTER, *self.gm.members]:
            self._send(peer, m.InstanceDown(instance, reason))

    def _send(self, peer: object, message: object) -> None:
        """Best effort: an unreachable peer must not stop an announcement to the others."""
        try:
            self.endpoint.send(peer, message)
        except TransportClosed:
            raise
        except Exception:  # noqa: BLE001
            logger.warning("gManager: could not send %s to %r", type(message).__name__, peer)

    def _send_view(self) -> None:
        now = time.monotonic()
        statuses = {
            i: s.status(self.gm.liveness(i, now), self.gm.heartbeat_age(i, now))
            for i in self.gm.members if (s := self.gm.status(i)) is not None
        }
        self.endpoint.send(m.ROUTER, m.ClusterView(statuses))

    def _send_orders(self) -> None:
        for order in self.gm.plan_migrations(self.perf, self.rebalancer_config):
            home = self.gm.home_of(order.request_id)
            if home is not None:
                self.endpoint.send(home, order)
                self.num_orders_sent += 1
