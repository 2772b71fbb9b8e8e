"""Background block copies (migration) of one instance, overlapped with the step's compute.

A plan's `BlockMove`s are full blocks: nothing writes their source while they are copied, and
nothing reads their target until the control plane commits the copy at the next step (see
control/migration.py). So the copy runs on its own thread (and, on a GPU, its own CUDA stream),
over its own transport channel so that its messages never interleave with the per-layer
query/partial exchange, while the instance computes the step. `wait()` at the start of the next
`execute` makes the copy visible and lets the freed source block be reused.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Optional

import torch

from infinite_llm.control.plan import BlockMove
from infinite_llm.runtime.transport import Transport

if TYPE_CHECKING:  # instance.py imports this module
    from infinite_llm.runtime.instance import PagedKVCache


class BlockCopier:
    def __init__(self, rank: int, cache: "PagedKVCache", channel: Optional[Transport], device: torch.device) -> None:
        self.rank = rank
        self.cache = cache
        self.channel = channel
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.num_blocks_sent = 0
        self.num_blocks_received = 0

    def start(self, moves: list[BlockMove]) -> None:
        """Begin this instance's part of the moves in the background (after waiting for the last)."""
        self.wait()
        mine = [m for m in moves if self.rank in (m.src.instance, m.dst.instance)]
        if not mine:
            return
        if any(m.src.instance != m.dst.instance for m in mine) and self.channel is None:
            raise RuntimeError("cross-instance migration needs a transport channel")
        if self.stream is not None:
            # Blocks written by earlier steps' kernels must be complete before the copy reads them.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._thread = threading.Thread(target=self._run, args=(mine,), name=f"block-copier-{self.rank}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the copies started last are done; re-raise their error, if any."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"instance {self.rank}: block migration failed: {error}") from error

    def _run(self, moves: list[BlockMove]) -> None:
        try:
            stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with torch.inference_mode(), stream:
                self._copy(moves)
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), which re-raises it
            self._error = exc
            if self.channel is not None:
                self.channel.fail()  # peers waiting for this instance's blocks give up too

    def _copy(self, moves: list[BlockMove]) -> None:
        cache = self.cache
        outgoing: dict[int, list[torch.Tensor]] = {}
        incoming: dict[int, list[int]] = {}
        for move in moves:
            if move.src.instance == move.dst.instance:
                cache.load_block(move.dst.block, cache.block_payload(move.src.block))
            elif move.src.instance == self.rank:
                outgoing.setdefault(move.dst.instance, []).append(cache.block_payload(move.src.block))
            else:
                incoming.setdefault(move.src.instance, []).append(move.dst.block)
        if not outgoing and not incoming:
            return
        assert self.channel is not None
        numel = cache.block_numel()
        received = self.channel.exchange(
            {peer: torch.cat(payloads) for peer, payloads in outgoing.items()},
            {peer: (numel * len(blocks), cache.dtype) for peer, blocks in incoming.items()},
        )
        for peer, blocks in incoming.items():
            for i, block in enumerate(blocks):
                cache.load_block(block, received[peer][i * numel : (i + 1) * numel])
        self.num_blocks_sent += sum(len(p) for p in outgoing.values())
        self.num_blocks_received += sum(len(b) for b in incoming.values())
