"""Per-layer exchange between instances: queries (and new tokens' KV) out, (out, lse) back.

Every instance derives the exact message layout from the shared StepPlan, so a receiver always
knows how many elements and which dtype it will get from each peer: no size handshakes.

Two implementations with one interface:
- `LocalTransport`: instances are threads of one process (tests, the embedded single-machine
  mode); tensors are handed over by reference through per-pair FIFO queues.
- `TorchDistTransport`: instances are processes (Ray actors) in a torch.distributed group, gloo on
  CPU and NCCL on GPU, using non-blocking point-to-point send/recv.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from typing import Mapping

import torch


class Transport(ABC):
    rank: int
    world_size: int

    @abstractmethod
    def exchange(
        self,
        outgoing: Mapping[int, torch.Tensor],
        expected: Mapping[int, tuple[int, torch.dtype]],
    ) -> dict[int, torch.Tensor]:
        """Send one flat tensor to each peer in `outgoing`; receive one flat tensor of
        (numel, dtype) from each peer in `expected`. Both sides call with matching layouts."""

    def close(self) -> None:  # pragma: no cover - default no-op
        pass

    def fail(self) -> None:
        """Wake peers waiting on this instance's messages: it will not send them (best effort;
        a process group relies on its own timeout)."""


class LocalMailboxes:
    """The shared state of `LocalTransport`s: one FIFO queue per ordered (src, dst) pair."""

    def __init__(self, world_size: int, timeout_s: float = 300.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._queues = {
            (src, dst): queue.Queue()
            for src in range(world_size)
            for dst in range(world_size)
            if src != dst
        }
        self.failed = threading.Event()

    def put(self, src: int, dst: int, tensor: torch.Tensor) -> None:
        self._queues[(src, dst)].put(tensor)

    def get(self, src: int, dst: int) -> torch.Tensor:
        # Poll so that a failure in one instance thread wakes the others instead of hanging.
        waited = 0.0
        while True:
            if self.failed.is_set():
                raise RuntimeError("a peer instance failed during the step")
            try:
                return self._queues[(src, dst)].get(timeout=0.5)
            except queue.Empty:
                waited += 0.5
                if waited >= self.timeout_s:
                    raise TimeoutError(f"instance {dst} waited {waited:.0f}s for instance {src}")

    def drain(self) -> None:
        for q in self._queues.values():
            while not q.empty():
                q.get_nowait()


class LocalTransport(Transport):
    def __init__(self, rank: int, mailboxes: LocalMailboxes) -> None:
        self.rank = rank
        self.world_size = mailboxes.world_size
        self.mailboxes = mailboxes

    def fail(self) -> None:
        self.mailboxes.failed.set()

    def exchange(self, outgoing, expected):
        for peer, tensor in outgoing.items():
            self.mailboxes.put(self.rank, peer, tensor)
        received: dict[int, torch.Tensor] = {}
        for peer, (numel, dtype) in expected.items():
            tensor = self.mailboxes.get(peer, self.rank)
            if tensor.numel() != numel or tensor.dtype != dtype:
                raise RuntimeError(
                    f"instance {self.rank} expected {numel} x {dtype} from {peer}, "
                    f"got {tensor.numel()} x {tensor.dtype}: plans diverged"
                )
            received[peer] = tensor
        return received


class TorchDistTransport(Transport):
    """Point-to-point exchange over an initialised torch.distributed process group."""

    def __init__(self, device: torch.device, group=None) -> None:
        """`group`: a process group of all ranks (default: the world group). A second group
        gives an independent channel, e.g. for block copies running beside the exchange."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    def exchange(self, outgoing, expected):
        dist = self._dist
        requests = []
        received: dict[int, torch.Tensor] = {}
        # Post receives first, then sends; wait on all. Non-blocking on both sides, so two
        # peers sending to each other at once cannot deadlock.
        for peer, (numel, dtype) in sorted(expected.items()):
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            received[peer] = buffer
            requests.append(dist.irecv(buffer, src=peer, group=self.group))
        for peer, tensor in sorted(outgoing.items()):
            requests.append(dist.isend(tensor.contiguous().to(self.device), dst=peer, group=self.group))
        for request in requests:
            request.wait()
        return received

    def close(self) -> None:
        if self.group is None and self._dist.is_initialized():
            self._dist.destroy_process_group()
