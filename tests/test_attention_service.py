"""Attention as a service: a home's StepAttention with its holders' GuestAttention equals
monolithic causal attention, and a decode query message does not grow with the context."""

from __future__ import annotations

import threading

import torch

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.control.messages import AttnQuery
from infinite_llm.control.plan import BlockRef, SeqWork
from infinite_llm.control.rmanager import RManager
from infinite_llm.instance.attention import GuestAttention, PartialMailbox, StepAttention, build_step_layout
from infinite_llm.instance.kv_cache import PagedKVCache
from infinite_llm.model.llama import causal_attention
from infinite_llm.transport.serialize import frames_nbytes, to_frames

HQ, HKV, D, BS = 4, 2, 8, 4
CPU = torch.device("cpu")


def _cluster(num_instances: int, blocks: int = 32):
    cfg = ModelConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, num_hidden_layers=1)
    cache_cfg = CacheConfig(block_size=BS, num_blocks_per_instance=blocks)
    caches = [PagedKVCache(cfg, cache_cfg, torch.float32, CPU) for _ in range(num_instances)]
    rms = [RManager(i, blocks, blocks) for i in range(num_instances)]
    return caches, rms


def _place(rms, request_id: str, instances: list[int]) -> list[BlockRef]:
    """Block j of the request on instances[j]; remote blocks lent to home 0 with their positions."""
    table = []
    for index, instance in enumerate(instances):
        if instance == 0:
            table.extend(rms[0].allocate_local(request_id, 1))
        else:
            table.extend(rms[instance].lend(0, request_id, 1, [index]))
    return table


def _attend(caches, rms, batch: list[SeqWork], q, k, v, step: int = 1) -> torch.Tensor:
    mailbox = PartialMailbox()
    guests = [GuestAttention(i, rm, threading.Lock(), caches[i], CPU) for i, rm in enumerate(rms)]

    def send(dst: int, message: object) -> None:  # the holder's pump answers at once
        assert isinstance(message, AttnQuery)
        partial = guests[dst].serve(message)
        assert partial.error is None, partial.error
        mailbox.put(partial)

    layout = build_step_layout(batch, 0, BS, CPU)
    attention = StepAttention(0, step, layout, caches[0], send, mailbox, HQ, D, timeout_s=5)
    return attention.attend(0, q, k, v)


def _work(request_id: str, table: list[BlockRef], start: int, n: int) -> SeqWork:
    return SeqWork(request_id, [1] * n, start, table, sample=True)


def test_split_prefill_and_decode_equal_monolithic_attention():
    gen = torch.Generator().manual_seed(0)
    caches, rms = _cluster(3)
    length = 22  # 6 blocks over 3 instances, the last one partly filled
    table = _place(rms, "r", [0, 1, 2, 1, 0, 2])
    k_all = torch.randn(length, HKV, D, generator=gen)
    v_all = torch.randn(length, HKV, D, generator=gen)
    q_all = torch.randn(length, HQ, D, generator=gen)
    done = 0
    for step, chunk in enumerate([9, 7, 5, 1], start=1):  # prefill chunks, then a decode token
        rows = slice(done, done + chunk)
        out = _attend(caches, rms, [_work("r", table, done, chunk)], q_all[rows], k_all[rows], v_all[rows], step)
        expected = causal_attention(q_all[rows], k_all[: done + chunk], v_all[: done + chunk])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        done += chunk


def test_batch_mixing_local_and_split_requests():
    gen = torch.Generator().manual_seed(1)
    caches, rms = _cluster(2)
    local = _place(rms, "local", [0, 0, 0])
    split = _place(rms, "split", [1, 0, 1])
    n_local, n_split = 10, 11
    batch = [_work("local", local, 0, n_local), _work("split", split, 0, n_split)]
    q = torch.randn(n_local + n_split, HQ, D, generator=gen)
    k = torch.randn(n_local + n_split, HKV, D, generator=gen)
    v = torch.randn(n_local + n_split, HKV, D, generator=gen)
    out = _attend(caches, rms, batch, q, k, v)
    torch.testing.assert_close(out[:n_local], causal_attention(q[:n_local], k[:n_local], v[:n_local]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[n_local:], causal_attention(q[n_local:], k[n_local:], v[n_local:]),
                               atol=1e-5, rtol=1e-5)


def _decode_query_bytes(context: int, block_size: int = 16) -> int:
    """Bytes of the AttnQuery a home sends a holder for one decode token of one request."""
    num_blocks = -(-(context + 1) // block_size)
    table = [BlockRef(0, 0)] * (num_blocks // 2) + [BlockRef(1, 0)] * (num_blocks - num_blocks // 2)
    work = SeqWork("r", [1], context, table, sample=True)
    layout = build_step_layout([work], 0, block_size, CPU)
    part = layout.remote[1]
    q = torch.zeros(1, 32, 128)
    kv = torch.zeros(len(part.kv_rows), 8, 128)
    message = AttnQuery(home=0, step=1, layer=0, seqs=part.seqs, q=q[part.q_rows], k=kv, v=kv)
    return frames_nbytes(to_frames(message))


def test_decode_message_is_constant_in_context_length():
    small, huge = _decode_query_bytes(10_000), _decode_query_bytes(1_000_000)
    # Only the position integer's encoding may grow (a byte or two), never a block list.
    assert abs(huge - small) <= 8, f"decode query grew from {small} to {huge} bytes with the context"


def test_a_query_is_served_inline_up_to_the_kv_it_reads(monkeypatch):
    """A holder serves a query on its home's thread while the K/V its MicroAttention reads (the
    visible slots of the blocks lent to that request) is at most INLINE_MAX_KV_BYTES."""
    import infinite_llm.instance.attention as attention_module

    caches, rms = _cluster(2)
    table = _place(rms, "r", [0, 1, 1])  # holder 1: positions 4-7 and 8-10 of an 11-token context
    layout = build_step_layout([_work("r", table, 10, 1)], 0, BS, CPU)
    part = layout.remote[1]
    kv = torch.zeros(len(part.kv_rows), HKV, D)
    query = AttnQuery(home=0, step=1, layer=0, seqs=part.seqs, q=torch.zeros(1, HQ, D), k=kv, v=kv)
    guest = GuestAttention(1, rms[1], threading.Lock(), caches[1], CPU)
    read = 7 * 2 * HKV * D * 4  # 7 visible slots, K and V, float32
    monkeypatch.setattr(attention_module, "INLINE_MAX_KV_BYTES", read)
    assert guest.serves_inline(query)
    monkeypatch.setattr(attention_module, "INLINE_MAX_KV_BYTES", read - 1)
    assert not guest.serves_inline(query)
