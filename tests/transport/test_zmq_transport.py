"""Transport contract tests, run against both implementations where the contract is shared.

The contract (see `transport/base.py`): per-pair FIFO, thread-safe non-blocking send, any pair
may talk at any time, recv(timeout) returns None on timeout, close() wakes a blocked recv.
ZeroMQ-only tests cover serialization, failure modes and a real second process.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pytest
import torch

from infinite_llm.transport import serialize
from infinite_llm.transport.base import Endpoint, TransportClosed
from infinite_llm.transport.local import LocalFabric
from infinite_llm.transport.zmq_transport import PeerUnreachable, ZmqEndpoint
from tests.transport._peer import Payload, echo_doubled

pytestmark = pytest.mark.timeout(60)

MakeEndpoints = Callable[[Sequence[object]], list[Endpoint]]


def _local_endpoints(names: Sequence[object]) -> list[Endpoint]:
    fabric = LocalFabric()
    return [fabric.endpoint(name) for name in names]


def _zmq_endpoints(names: Sequence[object]) -> list[Endpoint]:
    endpoints = [ZmqEndpoint(name) for name in names]
    addresses = {e.name: e.address for e in endpoints}
    for endpoint in endpoints:
        endpoint.connect(addresses)
    return endpoints


@pytest.fixture(params=["local", "zmq"])
def make_endpoints(request: pytest.FixtureRequest) -> Iterator[MakeEndpoints]:
    """A factory of fully connected endpoints of one implementation, closed after the test."""
    factory = _local_endpoints if request.param == "local" else _zmq_endpoints
    created: list[Endpoint] = []

    def make(names: Sequence[object]) -> list[Endpoint]:
        endpoints = factory(names)
        created.extend(endpoints)
        return endpoints

    yield make
    for endpoint in created:
        endpoint.close()


def _recv_n(endpoint: Endpoint, n: int, timeout: float = 10.0) -> list[object]:
    """Exactly `n` messages, failing (not hanging) if they do not all come within `timeout`."""
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < n:
        message = endpoint.recv(timeout=max(0.0, deadline - time.monotonic()))
        assert message is not None, f"only {len(out)} of {n} messages arrived"
        out.append(message)
    return out


# ---- shared contract -------------------------------------------------------------------------


def test_fifo_per_sender_with_two_threads_sharing_an_endpoint(make_endpoints: MakeEndpoints):
    src, dst = make_endpoints(["src", "dst"])
    per_thread = 500

    def sender(thread_id: int) -> None:
        for seq in range(per_thread):
            # An occasional tensor makes message sizes uneven, as in real traffic.
            body = torch.full((64,), seq) if seq % 50 == 0 else None
            src.send("dst", (thread_id, seq, body))

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    received = _recv_n(dst, 2 * per_thread)
    for t in threads:
        t.join(timeout=5)
    for thread_id in range(2):
        seqs = [seq for tid, seq, _ in received if tid == thread_id]
        assert seqs == list(range(per_thread))
    assert src.messages_sent == 2 * per_thread


def test_any_pair_concurrently_without_deadlock(make_endpoints: MakeEndpoints):
    names = ["router", 0, 1]
    endpoints = make_endpoints(names)
    per_pair = 200
    received: dict[object, list[tuple]] = {}

    def pump(endpoint: Endpoint) -> None:
        received[endpoint.name] = _recv_n(endpoint, per_pair * (len(names) - 1))

    def sender(endpoint: Endpoint) -> None:
        for seq in range(per_pair):  # interleave destinations so every pair is busy at once
            for dst in names:
                if dst != endpoint.name:
                    endpoint.send(dst, (endpoint.name, seq))

    threads = [threading.Thread(target=pump, args=(e,)) for e in endpoints]
    threads += [threading.Thread(target=sender, args=(e,)) for e in endpoints]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
        assert not t.is_alive(), "deadlock: a pump or sender did not finish"
    for dst in names:
        for src in names:
            if src != dst:
                assert [s for n, s in received[dst] if n == src] == list(range(per_pair))


def test_recv_timeout_returns_none(make_endpoints: MakeEndpoints):
    (endpoint,) = make_endpoints(["lonely"])
    start = time.monotonic()
    assert endpoint.recv(timeout=0.2) is None
    assert 0.15 <= time.monotonic() - start < 1.0
    assert endpoint.recv(timeout=0) is None


def test_close_wakes_blocked_recv(make_endpoints: MakeEndpoints):
    (endpoint,) = make_endpoints(["pump"])
    outcome: list[object] = []

    def pump() -> None:
        try:
            outcome.append(endpoint.recv(timeout=None))
        except TransportClosed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=pump)
    thread.start()
    time.sleep(0.2)  # let it block
    start = time.monotonic()
    endpoint.close()
    thread.join(timeout=1.0)
    assert not thread.is_alive() and time.monotonic() - start < 1.0
    assert isinstance(outcome[0], TransportClosed)
    with pytest.raises(TransportClosed):
        endpoint.recv(timeout=0.1)


def test_send_to_unknown_peer_names_it(make_endpoints: MakeEndpoints):
    (endpoint,) = make_endpoints(["a"])
    with pytest.raises(KeyError, match="nobody"):
        endpoint.send("nobody", "hello")


def test_send_to_self(make_endpoints: MakeEndpoints):
    (endpoint,) = make_endpoints([7])
    endpoint.send(7, "note to self")
    assert endpoint.recv(timeout=5) == "note to self"


# ---- serialization ---------------------------------------------------------------------------


@dataclass
class _Blocks:
    layer: int
    keys: torch.Tensor
    parts: list[torch.Tensor]
    meta: dict[str, object]


def _sample_message() -> _Blocks:
    base = torch.randn(4, 6)
    return _Blocks(
        layer=3,
        keys=torch.randn(2, 16, 8),
        parts=[torch.randn(5, 3).to(torch.bfloat16), torch.arange(-7, 9, dtype=torch.int64)],
        meta={
            "empty": torch.empty(0, 128),
            "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
            "scalar": torch.tensor(2.5),
            "strided": base.t()[1:, ::2],  # non-contiguous view
            "grad": torch.ones(3, requires_grad=True),
            "nested": [{"ids": torch.tensor([1, 2, 3], dtype=torch.int32)}, "text", 4.0],
        },
    )


def _assert_same(a: object, b: object) -> None:
    """Structural equality that compares tensors by dtype, shape and exact values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape
        assert torch.equal(a.detach(), b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, _Blocks):
        assert isinstance(b, _Blocks)
        for name in ("layer", "keys", "parts", "meta"):
            _assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b


def test_serialize_round_trip_nested_tensors():
    message = _sample_message()
    frames = serialize.to_frames(message)
    # every dense tensor left the pickle as its own frame
    assert len(frames) == 1 + 9
    back = serialize.from_frames([bytes(f) for f in frames])  # read-only: every frame copied
    _assert_same(message, back)
    keys = back.keys
    keys.add_(1.0)  # received tensors are writable and own their memory
    assert keys.data_ptr() % 16 == 0 and not back.meta["grad"].requires_grad


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
     torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn],
)
def test_serialize_every_dtype(dtype: torch.dtype):
    tensor = (torch.randn(3, 5) * 10).to(dtype)
    (back,) = serialize.from_frames(serialize.to_frames([tensor]))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_serialize_adopts_large_writable_frames_and_copies_misaligned_ones():
    tensor = torch.randn(serialize.ZERO_COPY_MIN_BYTES // 4 + 3)
    header, frame = serialize.to_frames(tensor)
    owned = bytearray(frame)  # what a network receive hands over
    adopted = serialize.from_frames([header, owned])
    assert torch.equal(adopted, tensor)
    owned[:4] = bytes(4)  # the tensor is a view of the adopted buffer, no copy was made
    assert adopted[0].item() == 0.0
    shifted = memoryview(bytearray(len(owned) + 1))[1:]  # writable but not 4-byte aligned
    shifted[:] = frame
    copied = serialize.from_frames([header, shifted])
    assert torch.equal(copied, tensor) and copied.data_ptr() % 4 == 0
    copied.mul_(2)  # writable either way


def test_serialize_keeps_aliasing_and_sends_shared_tensor_once():
    shared = torch.randn(100)
    frames = serialize.to_frames({"a": shared, "b": [shared]})
    assert len(frames) == 2
    back = serialize.from_frames(frames)
    assert back["a"] is back["b"][0]


def test_zmq_round_trip_and_counters():
    src, dst = _zmq_endpoints(["src", "dst"])
    try:
        message = _sample_message()
        message.parts.append(torch.randn(1 << 18))  # 1 MB: received without a copy
        src.send("dst", message)
        back = dst.recv(timeout=5)
        _assert_same(message, back)
        back.parts[-1].add_(1)  # adopted zmq buffers are writable
        tensor_bytes = 2 * 16 * 8 * 4 + 15 * 2 + 16 * 8
        assert src.messages_sent == 1 and src.bytes_sent > tensor_bytes
    finally:
        src.close()
        dst.close()


def test_local_passes_by_reference():
    src, dst = _local_endpoints(["src", "dst"])
    message = _sample_message()
    src.send("dst", message)
    assert dst.recv(timeout=1) is message


def test_local_inline_handler_takes_its_type_on_the_senders_thread():
    src, dst = _local_endpoints(["src", "dst"])
    seen: list[tuple[object, str]] = []
    assert dst.handle_inline(int, lambda message: seen.append((message, threading.current_thread().name)) or True)
    src.send("dst", 7)
    src.send("dst", "queued")
    assert seen == [(7, threading.current_thread().name)]  # handled at send, not queued
    assert dst.recv(timeout=1) == "queued" and dst.recv(timeout=0.01) is None


def test_local_inline_message_never_overtakes_an_earlier_queued_one_of_its_pair():
    a, b, dst = _local_endpoints(["a", "b", "dst"])
    seen: list[object] = []
    assert dst.handle_inline(int, lambda message: seen.append(message) or True)
    a.send("dst", "first")
    a.send("dst", 1)  # "first" is still queued: 1 must queue behind it
    b.send("dst", 2)  # another sender's pair has nothing queued: inline
    assert seen == [2]
    assert dst.recv(timeout=1) == "first"
    a.send("dst", 3)  # "first" is being handled (the pump has not come back): still queued
    assert dst.recv(timeout=1) == 1 and dst.recv(timeout=1) == 3
    assert dst.recv(timeout=0.01) is None  # the pump came back: a's pair is empty again
    a.send("dst", 4)
    assert seen == [2, 4]


def test_local_inline_handler_may_decline_a_message_which_then_queues():
    src, dst = _local_endpoints(["src", "dst"])
    assert dst.handle_inline(int, lambda message: message < 10)
    src.send("dst", 5)
    src.send("dst", 50)
    assert dst.recv(timeout=1) == 50 and dst.recv(timeout=0.01) is None


def test_zmq_has_no_inline_handlers():
    endpoint = ZmqEndpoint("inline")
    try:
        assert not endpoint.handle_inline(int, lambda message: None)
    finally:
        endpoint.close()


# ---- ZeroMQ failure modes and wiring ---------------------------------------------------------


def _unused_tcp_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_send_to_gone_peer_times_out_with_peer_name():
    endpoint = ZmqEndpoint("a", hwm=2, send_timeout_ms=100)
    endpoint.connect({"ghost": _unused_tcp_address()})
    try:
        with pytest.raises(PeerUnreachable, match="ghost"):
            for i in range(100):  # queues fill up (hwm) and then the send times out
                endpoint.send("ghost", i)
    finally:
        endpoint.close()


def test_send_after_close_raises():
    (endpoint,) = _zmq_endpoints(["a"])
    endpoint.close()
    with pytest.raises(TransportClosed):
        endpoint.send("a", "late")


def test_connect_later_and_readdress_peer():
    a, b_old = _zmq_endpoints(["a", "b"])
    try:
        a.send("b", "to old")
        assert b_old.recv(timeout=5) == "to old"
        b_old.close()
        b_new = ZmqEndpoint("b")  # "b" restarted elsewhere; a learns the new address
        a.connect({"b": b_new.address, "c": _unused_tcp_address()})
        a.send("b", "to new")
        assert b_new.recv(timeout=5) == "to new"
        assert set(a.peers) == {"a", "b", "c"}
        b_new.close()
    finally:
        a.close()


def test_two_processes_exchange_tensors():
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=echo_doubled, args=("child", child_conn), daemon=True)
    child.start()
    with ZmqEndpoint("parent") as endpoint:
        try:
            assert parent_conn.poll(30), "child did not report its address"
            endpoint.connect({"child": parent_conn.recv()})
            parent_conn.send({"parent": endpoint.address})
            tensors = [torch.randn(32, 8).to(torch.bfloat16), torch.arange(10), torch.empty(0)]
            endpoint.send("child", Payload(1, tensors, {"reply_to": "parent"}))
            reply = endpoint.recv(timeout=30)
            assert isinstance(reply, Payload) and reply.seq == 2
            for sent, got in zip(tensors, reply.tensors):
                assert got.dtype == sent.dtype and torch.equal(got, sent * 2)
            parent_conn.send("done")
        finally:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    assert child.exitcode == 0
