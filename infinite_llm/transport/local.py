"""In-process transport: endpoints are queues; messages are handed over by reference."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Callable, Optional

from infinite_llm.transport.base import Address, Endpoint, TransportClosed

_CLOSED = object()


class LocalFabric:
    """Creates the endpoints of one process and routes between them.

    A message type with an inline handler at its destination is offered to it on the sender's
    thread, unless an earlier message of the same pair is still queued or being handled: then it
    queues, so every pair stays FIFO. It also queues if the handler declines it (returns False).
    `_pending[(src, dst)]` counts the queued ones; a message stops counting when the
    destination's pump asks for the next one (it has handled this one).
    """

    def __init__(self) -> None:
        self._queues: dict[Address, queue.SimpleQueue] = {}
        self._inline: dict[Address, dict[type, Callable[[object], bool]]] = {}
        self._pending: Counter[tuple[Address, Address]] = Counter()
        self._lock = threading.Lock()

    def endpoint(self, name: Address) -> "LocalEndpoint":
        with self._lock:
            if name in self._queues:
                raise ValueError(f"endpoint {name!r} already exists")
            self._queues[name] = queue.SimpleQueue()
        return LocalEndpoint(self, name)

    def deliver(self, src: Address, dst: Address, message: object) -> None:
        q = self._queues.get(dst)
        if q is None:
            raise KeyError(f"no endpoint named {dst!r}")
        handler = self._inline.get(dst, {}).get(type(message))
        # Unlocked read: only src's own threads add to this pair, and a send racing another of
        # the same sender has no order to keep.
        if handler is not None and not self._pending[(src, dst)] and handler(message):
            return
        with self._lock:
            self._pending[(src, dst)] += 1
            q.put((src, message))

    def handled(self, src: Address, dst: Address) -> None:
        """`dst`'s pump is done with a queued message from `src`."""
        with self._lock:
            self._pending[(src, dst)] -= 1
            if not self._pending[(src, dst)]:
                del self._pending[(src, dst)]

    def _queue(self, name: Address) -> queue.SimpleQueue:
        return self._queues[name]


class LocalEndpoint(Endpoint):
    def __init__(self, fabric: LocalFabric, name: Address) -> None:
        super().__init__()
        self.fabric = fabric
        self.name = name
        self._inbox = fabric._queue(name)
        self._closed = False
        self._in_hand: Optional[Address] = None  # the sender of the message recv last returned

    def send(self, dst: Address, message: object) -> None:
        self.messages_sent += 1
        self.fabric.deliver(self.name, dst, message)

    def recv(self, timeout: Optional[float] = None) -> Optional[object]:
        if self._in_hand is not None:  # the caller is back: it has handled the last message
            self.fabric.handled(self._in_hand, self.name)
            self._in_hand = None
        if self._closed:
            raise TransportClosed(f"endpoint {self.name!r} is closed")
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._closed = True
            raise TransportClosed(f"endpoint {self.name!r} is closed")
        self._in_hand, message = item
        return message

    def close(self) -> None:
        self._inbox.put(_CLOSED)

    def handle_inline(self, message_type: type, handler: Callable[[object], bool]) -> bool:
        with self.fabric._lock:  # replaced whole: deliver() reads it without the lock
            handlers = dict(self.fabric._inline.get(self.name, {}))
            handlers[message_type] = handler
            self.fabric._inline[self.name] = handlers
        return True
