"""BlockCopier: block copies run in the background and are complete after wait()."""

from __future__ import annotations

import threading

import pytest
import torch

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.control.plan import BlockMove, BlockRef
from infinite_llm.runtime.block_copier import BlockCopier
from infinite_llm.runtime.instance import PagedKVCache
from infinite_llm.runtime.transport import LocalMailboxes, LocalTransport


def _cache(seed: int) -> PagedKVCache:
    mc = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    cache = PagedKVCache(mc, CacheConfig(block_size=4, num_blocks_per_instance=6), torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


class _GatedTransport(LocalTransport):
    """Holds every exchange until the test opens the gate: the copy cannot finish early."""

    def __init__(self, rank, mailboxes, gate: threading.Event):
        super().__init__(rank, mailboxes)
        self.gate = gate

    def exchange(self, outgoing, expected):
        assert self.gate.wait(timeout=30)
        return super().exchange(outgoing, expected)


def test_copy_runs_in_background_and_is_visible_after_wait():
    gate = threading.Event()
    boxes = LocalMailboxes(2, timeout_s=30)
    caches = [_cache(0), _cache(1)]
    copiers = [BlockCopier(r, caches[r], _GatedTransport(r, boxes, gate), torch.device("cpu")) for r in range(2)]
    moves = [BlockMove(BlockRef(0, 2), BlockRef(1, 5)), BlockMove(BlockRef(0, 3), BlockRef(1, 0)),
             BlockMove(BlockRef(1, 1), BlockRef(1, 4))]  # two cross-instance, one within instance 1
    expected_cross = [caches[0].block_payload(2), caches[0].block_payload(3)]
    for copier in copiers:
        copier.start(moves)  # returns while the exchange is still held at the gate
    assert not torch.equal(caches[1].block_payload(5), expected_cross[0])
    gate.set()
    for copier in copiers:
        copier.wait()
    assert torch.equal(caches[1].block_payload(5), expected_cross[0])
    assert torch.equal(caches[1].block_payload(0), expected_cross[1])
    assert torch.equal(caches[1].block_payload(4), caches[1].block_payload(1))
    assert copiers[0].num_blocks_sent == 2 and copiers[1].num_blocks_received == 2


class _BrokenTransport(LocalTransport):
    def exchange(self, outgoing, expected):
        raise OSError("link down")


def test_failed_copy_is_reported_at_wait_and_wakes_the_peer():
    boxes = LocalMailboxes(2, timeout_s=30)
    caches = [_cache(0), _cache(1)]
    sender = BlockCopier(0, caches[0], _BrokenTransport(0, boxes), torch.device("cpu"))
    receiver = BlockCopier(1, caches[1], LocalTransport(1, boxes), torch.device("cpu"))
    moves = [BlockMove(BlockRef(0, 2), BlockRef(1, 5))]
    sender.start(moves)
    receiver.start(moves)
    with pytest.raises(RuntimeError, match="block migration failed: link down"):
        sender.wait()
    with pytest.raises(RuntimeError, match="block migration failed"):
        receiver.wait()  # woken by the failure instead of waiting out the timeout
