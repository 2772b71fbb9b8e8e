"""Transport between processes and hosts (e.g. Ray actors) over ZeroMQ.

Each `ZmqEndpoint` binds one PULL socket; everybody who wants to reach it connects a PUSH socket
to its address. A sender keeps one PUSH socket per destination, so each ordered pair (src, dst)
is one TCP connection, and TCP plus zmq's in-order queues give the per-pair FIFO the protocols
rely on. PUSH/PULL needs no reply and no agreed step layout: any endpoint may send to any other
at any time, and `send` returns once the message is queued for zmq's I/O thread.

Messages are framed by `transport.serialize`: a pickle header plus one raw frame per tensor,
so tensor bytes are neither copied into the pickle nor copied on the way out. CUDA tensors are
moved to the CPU by the sender (see `serialize` for the full list of rules).

Wiring, e.g. with Ray: an endpoint holds sockets and cannot be pickled, so each actor creates
its own, reports `endpoint.address` to the driver, and the driver hands every actor the full
`{name: address}` map to `connect()`. `connect()` may be called again as roles join.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import zmq

from infinite_llm.transport import serialize
from infinite_llm.transport.base import Address, Endpoint, TransportClosed

# Longest single wait inside recv(): close() from another thread is noticed within this.
_POLL_SLICE_S = 0.1


class PeerUnreachable(RuntimeError):
    """A message could not be queued for a peer within the send timeout (peer gone or stalled).

    The pair's FIFO has a gap after this: the failed message was not sent, later ones may be.
    """


@dataclass
class _Peer:
    """Where one destination lives, and the PUSH socket to it (opened on first send).

    zmq sockets are not thread-safe, so every use of `socket` happens under `lock`; holding the
    lock while sending is also what makes concurrent senders' messages form one FIFO stream.
    """

    address: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    socket: Optional[zmq.Socket] = None


class ZmqEndpoint(Endpoint):
    """One role's mailbox, reachable by other processes at `self.address`.

    `bind_host` is the interface to listen on; `advertise_host` is the host name others should
    dial (needed when binding to 0.0.0.0). `port=0` picks a free port. `send_timeout_ms` bounds
    how long `send` may wait when a peer's queue is full (the peer died or stopped reading);
    `hwm` is the queue length, in messages, per pair and direction, before that happens.
    `close_linger_ms` is how long messages still queued at `close()` are given to leave.
    """

    def __init__(
        self,
        name: Address,
        bind_host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: Optional[str] = None,
        context: Optional[zmq.Context] = None,
        send_timeout_ms: int = 5000,
        hwm: int = 100_000,
        close_linger_ms: int = 500,
    ) -> None:
        super().__init__()
        self.name = name
        self._context = context if context is not None else zmq.Context.instance()
        self._send_timeout_ms = send_timeout_ms
        self._hwm = hwm
        self._close_linger_ms = close_linger_ms
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, hwm)
        self._pull.setsockopt(zmq.LINGER, 0)
        if port:
            self._pull.bind(f"tcp://{bind_host}:{port}")
        else:
            port = self._pull.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{advertise_host or bind_host}:{port}"
        self._peers: dict[Address, _Peer] = {name: _Peer(self.address)}  # sending to self works
        self._peers_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._recv_lock = threading.Lock()  # held by the pump while it uses the PULL socket
        self._closed = False

    def __repr__(self) -> str:
        return f"ZmqEndpoint({self.name!r}, {self.address!r})"

    def connect(self, peers: Mapping[Address, str]) -> None:
        """Learn (or update) where peers live; sockets are opened lazily on the first send.

        An entry for this endpoint's own name is ignored. A peer whose address changed gets a new
        socket; messages still queued for its old address are dropped.
        """
        for dst, address in peers.items():
            if dst == self.name:
                continue
            with self._peers_lock:
                peer = self._peers.get(dst)
                if peer is None:
                    self._peers[dst] = _Peer(address)
                    continue
            with peer.lock:
                if peer.address != address:
                    self._close_socket(peer, linger_ms=0)
                    peer.address = address

    @property
    def peers(self) -> dict[Address, str]:
        """The known `{name: address}` map, this endpoint included."""
        with self._peers_lock:
            return {dst: peer.address for dst, peer in self._peers.items()}

    def send(self, dst: Address, message: object) -> None:
        """Queue `message` for `dst`; raises KeyError for an unknown peer, PeerUnreachable when the
        peer's queue stays full for the send timeout, TransportClosed after close()."""
        with self._peers_lock:
            peer = self._peers.get(dst)
        if peer is None:
            raise KeyError(f"{self.name!r} has no address for peer {dst!r}; call connect() first")
        # Serialize outside the peer lock so threads sending to one peer pickle in parallel.
        frames = serialize.to_frames(message)
        with peer.lock:
            if self._closed:
                raise TransportClosed(f"endpoint {self.name!r} is closed")
            socket = peer.socket or self._open_socket(peer)
            try:
                # copy=False: large frames are handed to zmq by reference (the tensors' memory).
                socket.send_multipart(frames, copy=False)
            except zmq.Again:
                raise PeerUnreachable(
                    f"{self.name!r} could not send to peer {dst!r} at {peer.address} within "
                    f"{self._send_timeout_ms} ms: its queue is full (peer gone or not reading)"
                ) from None
        with self._counter_lock:
            self.messages_sent += 1
            self.bytes_sent += serialize.frames_nbytes(frames)

    def _open_socket(self, peer: _Peer) -> zmq.Socket:
        """A PUSH socket to `peer` (caller holds `peer.lock`)."""
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, self._hwm)
        socket.setsockopt(zmq.SNDTIMEO, self._send_timeout_ms)
        # LINGER 0: a dead peer must never make socket/context teardown hang; close() grants a
        # bounded grace period explicitly instead.
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(peer.address)
        peer.socket = socket
        return socket

    @staticmethod
    def _close_socket(peer: _Peer, linger_ms: int) -> None:
        """Close `peer`'s PUSH socket if open (caller holds `peer.lock`)."""
        if peer.socket is not None:
            peer.socket.close(linger=linger_ms)
            peer.socket = None

    def recv(self, timeout: Optional[float] = None) -> Optional[object]:
        """The next message from any peer, None after `timeout` seconds, TransportClosed once
        closed. Messages still queued when close() is called are not delivered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            while True:
                if self._closed:
                    self._close_pull()
                    raise TransportClosed(f"endpoint {self.name!r} is closed")
                wait = _POLL_SLICE_S
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                # Poll in short slices rather than once: close() runs in another thread and may
                # not touch this socket, so the pump must notice the closed flag on its own.
                if self._pull.poll(math.ceil(wait * 1000), zmq.POLLIN):
                    # A multipart message arrives whole, so this does not block after POLLIN.
                    return serialize.from_frames(self._pull.recv_multipart(copy=False))
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def _close_pull(self) -> None:
        """Close the PULL socket (caller holds `_recv_lock`, so the pump is not using it)."""
        if not self._pull.closed:
            self._pull.close(linger=0)

    def close(self) -> None:
        """Stop receiving and sending. A pump blocked in recv() gets TransportClosed within
        about 0.1 s. Messages already sent get `close_linger_ms` to leave; later ones are dropped.
        """
        if self._closed:
            return
        self._closed = True
        # Whoever holds _recv_lock owns the PULL socket: wait for the pump to leave recv(), which
        # it does on its next poll slice; if it somehow does not, it closes the socket itself.
        if self._recv_lock.acquire(timeout=2 * _POLL_SLICE_S + 1.0):
            try:
                self._close_pull()
            finally:
                self._recv_lock.release()
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                self._close_socket(peer, linger_ms=self._close_linger_ms)

    def __enter__(self) -> "ZmqEndpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
