"""In-process transport: endpoints are queues; messages are handed over by reference."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional

from infinite_llm.transport.base import Address, Endpoint, TransportClosed

_CLOSED = object()


class LocalFabric:
    """Creates the endpoints of one process and routes between them."""

    def __init__(self) -> None:
        self._queues: dict[Address, queue.SimpleQueue] = {}
        self._inline: dict[Address, dict[type, Callable[[object], None]]] = {}
        self._lock = threading.Lock()

    def endpoint(self, name: Address) -> "LocalEndpoint":
        with self._lock:
            if name in self._queues:
                raise ValueError(f"endpoint {name!r} already exists")
            self._queues[name] = queue.SimpleQueue()
        return LocalEndpoint(self, name)

    def deliver(self, dst: Address, message: object) -> None:
        handler = self._inline.get(dst, {}).get(type(message))
        if handler is not None:
            handler(message)
            return
        q = self._queues.get(dst)
        if q is None:
            raise KeyError(f"no endpoint named {dst!r}")
        q.put(message)

    def _queue(self, name: Address) -> queue.SimpleQueue:
        return self._queues[name]


class LocalEndpoint(Endpoint):
    def __init__(self, fabric: LocalFabric, name: Address) -> None:
        super().__init__()
        self.fabric = fabric
        self.name = name
        self._inbox = fabric._queue(name)
        self._closed = False

    def send(self, dst: Address, message: object) -> None:
        self.messages_sent += 1
        self.fabric.deliver(dst, message)

    def recv(self, timeout: Optional[float] = None) -> Optional[object]:
        if self._closed:
            raise TransportClosed(f"endpoint {self.name!r} is closed")
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if message is _CLOSED:
            self._closed = True
            raise TransportClosed(f"endpoint {self.name!r} is closed")
        return message

    def close(self) -> None:
        self._inbox.put(_CLOSED)

    def handle_inline(self, message_type: type, handler: Callable[[object], None]) -> bool:
        with self.fabric._lock:  # replaced whole: deliver() reads it without the lock
            handlers = dict(self.fabric._inline.get(self.name, {}))
            handlers[message_type] = handler
            self.fabric._inline[self.name] = handlers
        return True
