"""The message transport every role talks through.

An `Endpoint` is one role's mailbox: instance `i` (an int), "router" or "gmanager". Any endpoint
may send any picklable message (dataclasses from `control/messages.py`, which may hold CPU torch
tensors) to any other at any time; there is no step layout to agree on. Guarantees:

- per ordered pair (src, dst), messages arrive in the order they were sent (FIFO). The
  protocols rely on this one ordering rule (e.g. a holder sees a block attached before the
  first query that reads it);
- `send` is thread-safe and does not wait for the receiver;
- `recv` is called by one thread per endpoint (the role's message pump).

Two implementations: `LocalFabric` (threads of one process, objects handed over by reference)
and `ZmqFabric` (processes/hosts: one PULL socket per endpoint, tensors as raw frames).

Why not NCCL point-to-point: paired isend/irecv must be posted in matching order on both sides
(ungrouped sends in both directions can deadlock), and a communicator used from a second thread
can hang, while here any role sends at any time from several threads (step loop, pump,
heartbeats) and nobody waits for a matching receive. Sockets give exactly the one rule above
(FIFO per ordered pair) with no matching and no collective; device tensors are staged through
host memory. A GPU-direct path would have to keep that contract (e.g. one dedicated sender
thread per pair issuing grouped `batch_isend_irecv`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Hashable, Optional

Address = Hashable  # an instance id (int), "router" or "gmanager"


class TransportClosed(RuntimeError):
    """The endpoint was closed; no more messages will arrive."""


class Endpoint(ABC):
    name: Address

    def __init__(self) -> None:
        self.bytes_sent = 0  # payload bytes (tensor data + header) sent, where measurable
        self.messages_sent = 0

    @abstractmethod
    def send(self, dst: Address, message: object) -> None:
        """Queue `message` for `dst` (FIFO per pair); never waits for the receiver."""

    @abstractmethod
    def recv(self, timeout: Optional[float] = None) -> Optional[object]:
        """The next message, or None after `timeout` seconds. TransportClosed once closed."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving; a thread blocked in recv() gets TransportClosed."""

    def handle_inline(self, message_type: type, handler: Callable[[object], bool]) -> bool:
        """Ask for messages of `message_type` to this endpoint to be offered to `handler` on the
        sender's thread, skipping the queue and the receiving pump's wake-ups (a split step's
        per-layer query and reply). `handler` returns whether it took the message; one it
        declines is queued. FIFO per pair still holds: a message is queued while an earlier one
        from the same sender is queued or being handled. `handler` must be thread-safe and must
        not raise. Returns whether the transport does this; if not, such messages come through
        recv."""
        return False
