"""Code a spawned child process runs in the cross-process transport test.

It lives in its own small module because a `spawn` child imports its target by module name:
keeping it out of the test module keeps the child's imports (and start-up time) small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Payload:
    """A message shaped like the real ones: scalars plus tensors nested in containers."""

    seq: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def echo_doubled(name: str, conn: Any) -> None:
    """Serve one request: reply to its sender with every tensor doubled, then exit.

    `conn` is one end of a multiprocessing Pipe, used only to swap addresses.
    """
    from infinite_llm.transport.zmq_transport import ZmqEndpoint

    with ZmqEndpoint(name) as endpoint:
        conn.send(endpoint.address)
        endpoint.connect(conn.recv())
        request = endpoint.recv(timeout=30)
        assert isinstance(request, Payload), request
        reply = Payload(request.seq + 1, [t * 2 for t in request.tensors], dict(request.extra))
        endpoint.send(request.extra["reply_to"], reply)
        conn.recv()  # parent says it got the reply: only now may close() drop the queue
