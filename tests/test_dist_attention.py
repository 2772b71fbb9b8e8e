"""DistAttention kernels: MicroAttention over block subsets + ScaleReduce == monolithic attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infinite_llm.kernels.attention_plan as plan_module
from infinite_llm.kernels import native_attention
from infinite_llm.kernels.dist_attention import (
    BlockIndex, micro_attention, micro_attention_torch, plan_micro_attention, scale_reduce,
)

FP32_TOL = 1e-5
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Seq:
    """One sequence: its full KV (float64, already rounded to the test dtype), queries, and blocks."""

    k: torch.Tensor            # [L, Hkv, D]
    v: torch.Tensor            # [L, Hkv, D]
    q: torch.Tensor            # [nq, Hq, D]
    q_pos: torch.Tensor        # [nq]
    segments: list[tuple[int, int]]  # (start, length) of each block, length in [1, block_size]


@dataclass
class Instance:
    """One instance's pool and the per-sequence lists of blocks it holds."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    blocks: list[list[tuple[int, int, int]]]  # per sequence: (block id, start, length)


def make_seq(gen: torch.Generator, hq: int, hkv: int, d: int, block_size: int, ctx: int, nq: int,
             future: int, dtype: torch.dtype) -> Seq:
    """`ctx` tokens of context whose last `nq` are the queries; `future` more KV tokens lie after
    every query (e.g. blocks a chunk writes ahead of the queries that must stay masked)."""
    length = ctx + future
    k = torch.randn(length, hkv, d, generator=gen).to(dtype).to(torch.float64)
    v = torch.randn(length, hkv, d, generator=gen).to(dtype).to(torch.float64)
    q = torch.randn(nq, hq, d, generator=gen).to(dtype).to(torch.float64)
    q_pos = torch.arange(ctx - nq, ctx, dtype=torch.int64)
    # Blocks of random fill (some single-token): real pools fill all but the last block, but the
    # kernel's contract allows any (start, len), so exercise it.
    segments, pos = [], 0
    while pos < length:
        n = min(length - pos, int(torch.randint(1, block_size + 1, (1,), generator=gen)))
        if torch.rand(1, generator=gen).item() < 0.5:
            n = min(length - pos, block_size)
        segments.append((pos, n))
        pos += n
    return Seq(k, v, q, q_pos, segments)


def distribute(gen: torch.Generator, seqs: list[Seq], num_instances: int, hkv: int, d: int, block_size: int,
               dtype: torch.dtype) -> list[Instance]:
    """Scatter every sequence's blocks over instances at random block ids, in random order."""
    owners = [torch.randint(0, num_instances, (len(s.segments),), generator=gen).tolist() for s in seqs]
    instances = []
    for i in range(num_instances):
        held = [[j for j, o in enumerate(own) if o == i] for own in owners]
        num_blocks = sum(len(h) for h in held) + 3  # spare blocks hold garbage
        ids = torch.randperm(num_blocks, generator=gen).tolist()
        k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
        blocks = []
        for s, seq in enumerate(seqs):
            mine = held[s]
            order = torch.randperm(len(mine), generator=gen).tolist()
            listed = []
            for j in (mine[o] for o in order):
                start, n = seq.segments[j]
                bid = ids.pop()
                k_cache[bid, :n] = seq.k[start:start + n].to(dtype)
                v_cache[bid, :n] = seq.v[start:start + n].to(dtype)
                listed.append((bid, start, n))
            blocks.append(listed)
        instances.append(Instance(k_cache, v_cache, blocks))
    return instances


def call_inputs(seqs: list[Seq], inst: Instance, dtype: torch.dtype, pad_blocks: int = 0):
    """micro_attention's arguments for all sequences on one instance (padding entries hold junk ids)."""
    width = max([len(b) for b in inst.blocks] + [0]) + pad_blocks
    s_count = len(seqs)
    tables = torch.full((s_count, width), -7, dtype=torch.int64)
    starts = torch.full((s_count, width), 10**6, dtype=torch.int64)
    lens = torch.zeros((s_count, width), dtype=torch.int64)
    for s, listed in enumerate(inst.blocks):
        for j, (bid, start, n) in enumerate(listed):
            tables[s, j], starts[s, j], lens[s, j] = bid, start, n
    q = torch.cat([s.q for s in seqs]).to(dtype)
    cu = torch.tensor([0] + [len(s.q) for s in seqs], dtype=torch.int64).cumsum(0)
    q_pos = torch.cat([s.q_pos for s in seqs])
    return q, inst.k_cache, inst.v_cache, BlockIndex(cu, q_pos, tables, starts, lens)


def reference(seq: Seq, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Monolithic float64 causal attention over the full sequence; returns (out, lse)."""
    hq, hkv = seq.q.shape[1], seq.k.shape[1]
    g = hq // hkv
    k = seq.k.repeat_interleave(g, dim=1)  # [L, Hq, D]
    v = seq.v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", seq.q, k) * scale
    key_pos = torch.arange(seq.k.shape[0])
    scores = scores.masked_fill(key_pos[None, None, :] > seq.q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, nq]
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out, lse.transpose(0, 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.to(torch.float64) - ref).norm().item() / max(ref.norm().item(), 1e-30)


def lse_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error of a log-sum-exp, relative where |lse| > 1 and absolute below: an absolute
    error e in an lse is a relative error of about e in the weight exp(lse) ScaleReduce gives its
    partial, so an lse near 0 (exp near 1) cannot be held to a tolerance relative to itself."""
    return ((x.to(torch.float64) - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def run_distributed(seqs: list[Seq], instances: list[Instance], dtype: torch.dtype, scale: float,
                    attention=micro_attention) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    for inst in instances:
        out, lse = attention(*call_inputs(seqs, inst, dtype, pad_blocks=1), scale=scale)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        outs.append(out)
        lses.append(lse)
    return scale_reduce(outs, lses)


shapes = st.tuples(
    st.sampled_from([1, 2, 4]),                   # Hkv
    st.sampled_from([1, 2, 4]),                   # group size G (1 = MHA, Hkv = 1 = MQA)
    st.sampled_from([16, 32, 64, 80, 128]),       # head dim
    st.integers(1, 9),                            # block size
)


@st.composite
def workloads(draw):
    hkv, g, d, block_size = draw(shapes)
    num_seqs = draw(st.integers(1, 4))
    # (context, queries): decode (1 query) or a prefill chunk of queries starting at an offset.
    per_seq = [
        (ctx, draw(st.sampled_from([1, 1, min(ctx, draw(st.integers(1, 24)))])), draw(st.sampled_from([0, 0, block_size + 1])))
        for ctx in draw(st.lists(st.integers(1, 60), min_size=num_seqs, max_size=num_seqs))
    ]
    return hkv, g, d, block_size, per_seq, draw(st.integers(1, 4)), draw(st.integers(0, 2**31 - 1))


def assert_rows_match_reference(seqs, out: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
    """Each sequence's rows of (out, lse), in order, equal the monolithic reference to float32 rounding."""
    row = 0
    for seq in seqs:
        ref_out, ref_lse = reference(seq, scale)
        n = len(seq.q)
        assert rel_err(out[row:row + n], ref_out) <= FP32_TOL
        assert lse_err(lse[row:row + n], ref_lse) <= FP32_TOL
        row += n


def check_against_reference(work, dtype: torch.dtype, attention=micro_attention) -> None:
    hkv, g, d, block_size, per_seq, num_instances, seed = work
    gen = torch.Generator().manual_seed(seed)
    seqs = [make_seq(gen, hkv * g, hkv, d, block_size, ctx, nq, fut, dtype) for ctx, nq, fut in per_seq]
    instances = distribute(gen, seqs, num_instances, hkv, d, block_size, dtype)
    scale = d ** -0.5
    out, lse = run_distributed(seqs, instances, dtype, scale, attention)
    assert_rows_match_reference(seqs, out, lse, scale)


@HYPOTHESIS
@given(workloads())
def test_distributed_equals_monolithic_fp32(work):
    check_against_reference(work, torch.float32)


@HYPOTHESIS
@given(workloads())
def test_torch_path_equals_monolithic_fp32(work):
    """The same with the native decode kernel off (machines without a C compiler run this path)."""
    with native_attention.disabled():
        check_against_reference(work, torch.float32)


def _native_or_skip():
    if native_attention.library() is None:
        pytest.skip("the native kernel is not built here (no C compiler?)")


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("hkv,g,d", [(4, 3, 64), (2, 4, 128), (1, 8, 32), (2, 2, 40)])
def test_native_decode_equals_monolithic(threads, hkv, g, d):
    """Decode rows go to the native kernel; with several threads a long sequence's blocks are
    split into parts merged inside the kernel, with one they are not: both exact."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(threads * 100 + d)
    bs = 16
    seqs = [make_seq(gen, hkv * g, hkv, d, bs, ctx, nq, fut, torch.float32)
            for ctx, nq, fut in [(1500, 1, 0), (37, 1, 5), (300, 4, 0), (1, 1, 0), (200, 40, 0)]]
    inst = distribute(gen, seqs, 1, hkv, d, bs, torch.float32)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = call_inputs(seqs, inst, torch.float32)
        plan = plan_micro_attention(*args)
        out, lse = micro_attention(*args)
    finally:
        torch.set_num_threads(before)
    assert plan.native is not None and plan.native.num_rows == 1 + 1 + 4 + 1  # the 40-query chunk is not native
    assert_rows_match_reference(seqs, out, lse, d ** -0.5)


def test_native_ignores_slots_no_query_sees():
    """NaN in slots past a block's length, in keys after every query, and in padding entries'
    blocks must not reach the output (the kernel masks scores and never reads those values)."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(4)
    k_cache = torch.randn(6, 16, 2, 32, generator=gen)
    v_cache = torch.randn(6, 16, 2, 32, generator=gen)
    q = torch.randn(2, 4, 32, generator=gen)
    tables, starts = torch.tensor([[3, 1, 5], [2, 0, 0]]), torch.tensor([[0, 16, 0], [0, 0, 0]])
    lens = torch.tensor([[16, 9, 0], [7, 0, 0]])
    args = (q, k_cache, v_cache, BlockIndex(torch.tensor([0, 1, 2]), torch.tensor([20, 6]), tables, starts, lens))
    with native_attention.disabled():
        ref_out, ref_lse = micro_attention(*args)
    k_cache[1, 9:], v_cache[1, 9:] = float("nan"), float("nan")  # past block 1's length
    k_cache[1, 5:], v_cache[1, 5:] = float("nan"), float("nan")  # positions 21.. (query 0 is at 20)
    k_cache[2, 7:], v_cache[2, 7:] = float("nan"), float("nan")
    k_cache[5], v_cache[5], k_cache[0], v_cache[0] = (torch.full((16, 2, 32), float("nan")),) * 4  # padding
    assert plan_micro_attention(*args).native is not None
    out, lse = micro_attention(*args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


@HYPOTHESIS
@given(workloads())
def test_distributed_equals_monolithic_bf16(work):
    # Inputs are bf16 but MA computes in float32: against a reference on the same bf16-rounded
    # inputs the only error left is float32 rounding, so the float32 bound applies unchanged.
    check_against_reference(work, torch.bfloat16)


def test_bf16_error_is_input_rounding_only():
    """Against the unrounded float64 inputs, the bf16 error is the size of bf16 input rounding."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, bs = 8, 2, 64, 16
    k = torch.randn(200, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(200, hkv, d, generator=gen, dtype=torch.float64)
    q = torch.randn(1, hq, d, generator=gen, dtype=torch.float64)
    seq = Seq(k, v, q, torch.tensor([199]), [(i, bs) if i + bs <= 200 else (i, 200 - i) for i in range(0, 200, bs)])
    inst = distribute(gen, [seq], 1, hkv, d, bs, torch.bfloat16)
    out, _ = micro_attention(*call_inputs([seq], inst[0], torch.bfloat16))
    ref_out, _ = reference(seq, d ** -0.5)
    err = rel_err(out, ref_out)
    bf16_unit_roundoff = 2.0 ** -8
    assert err <= 4 * bf16_unit_roundoff  # a few input roundings propagate, nothing more
    assert err > FP32_TOL  # the rounding is really there (the test can see it)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_matches_sdpa(hq, hkv):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    d, bs, ctx, nq = 32, 4, 37, 11
    seq = make_seq(gen, hq, hkv, d, bs, ctx, nq, 0, torch.float32)
    inst = distribute(gen, [seq], 1, hkv, d, bs, torch.float32)[0]
    out, _ = micro_attention(*call_inputs([seq], inst, torch.float32))
    key_pos = torch.arange(ctx)
    mask = key_pos[None, :] <= seq.q_pos[:, None]  # [nq, L]
    ref = F.scaled_dot_product_attention(
        seq.q.transpose(0, 1)[None], seq.k.transpose(0, 1)[None], seq.v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=True,
    )[0].transpose(0, 1)
    assert rel_err(out, ref) <= FP32_TOL


def test_long_context_is_chunked_and_exact(monkeypatch):
    """Shrink the chunk budget so one call runs many KV chunks through the online merge."""
    monkeypatch.setattr(plan_module, "_KV_CHUNK_ELEMS", 2 * 8 * 2 * 16)  # a couple of blocks per chunk
    monkeypatch.setattr(plan_module, "_MIN_CHUNK_SLOTS", 8)
    monkeypatch.setattr(plan_module, "_MASK_CHUNK_ELEMS", 64)  # masked chunks too
    gen = torch.Generator().manual_seed(11)
    hkv, g, d, bs = 2, 2, 16, 8
    seqs = [make_seq(gen, hkv * g, hkv, d, bs, ctx, nq, fut, torch.float32)
            for ctx, nq, fut in [(300, 1, 0), (257, 40, 9), (5, 5, 0), (120, 1, 17)]]
    instances = distribute(gen, seqs, 2, hkv, d, bs, torch.float32)
    out, lse = run_distributed(seqs, instances, torch.float32, d ** -0.5)
    assert_rows_match_reference(seqs, out, lse, d ** -0.5)


def test_batched_ragged_equals_per_sequence_calls():
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, bs = 2, 4, 32, 16
    # A prefill chunk next to decodes and an empty sequence: several padded groups.
    specs = [(40, 1, 0), (300, 64, 16), (17, 1, 0), (90, 1, 0), (1, 1, 0), (64, 3, 0)]
    seqs = [make_seq(gen, hkv * g, hkv, d, bs, ctx, nq, fut, torch.float32) for ctx, nq, fut in specs]
    seqs.insert(2, Seq(seqs[0].k, seqs[0].v, seqs[0].q[:0], seqs[0].q_pos[:0], seqs[0].segments))
    inst = distribute(gen, seqs, 1, hkv, d, bs, torch.float32)[0]
    out, lse = micro_attention(*call_inputs(seqs, inst, torch.float32))
    row = 0
    for s, seq in enumerate(seqs):
        single = Instance(inst.k_cache, inst.v_cache, [inst.blocks[s]])
        o, l = micro_attention(*call_inputs([seq], single, torch.float32))
        n = len(seq.q)
        torch.testing.assert_close(out[row:row + n], o, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[row:row + n], l, rtol=1e-6, atol=1e-6)
        row += n
    assert row == out.shape[0]


def test_query_seeing_no_key_gets_zero_and_neg_inf():
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.randn(4, 4, 1, 16, generator=gen)
    v_cache = torch.randn(4, 4, 1, 16, generator=gen)
    q = torch.randn(3, 2, 16, generator=gen)
    cu = torch.tensor([0, 2, 3])
    q_pos = torch.tensor([3, 8, 5])
    # seq 0 holds one block at positions 4..7 (future of query at 3, visible to query at 8);
    # seq 1 holds no block at all here.
    tables = torch.tensor([[2, 0], [0, 0]])
    starts = torch.tensor([[4, 0], [0, 0]])
    lens = torch.tensor([[4, 0], [0, 0]])
    out, lse = micro_attention(q, k_cache, v_cache, BlockIndex(cu, q_pos, tables, starts, lens))
    for t in (0, 2):
        assert torch.equal(out[t], torch.zeros(2, 16))
        assert torch.isneginf(lse[t]).all()
    assert torch.isfinite(lse[1]).all() and out[1].abs().sum() > 0


def test_scale_reduce_order_independent_and_stacked():
    gen = torch.Generator().manual_seed(8)
    outs = [torch.randn(5, 3, 8, generator=gen) for _ in range(4)]
    lses = [torch.randn(5, 3, generator=gen) * 10 for _ in range(4)]
    lses[2][1, 0] = float("-inf")  # one partial saw nothing for this row
    ref_out, ref_lse = scale_reduce(outs, lses)
    for perm in ([3, 1, 0, 2], [2, 3, 1, 0], [1, 0, 3, 2]):
        o, l = scale_reduce([outs[i] for i in perm], [lses[i] for i in perm])
        torch.testing.assert_close(o, ref_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l, ref_lse, rtol=1e-6, atol=1e-6)
    o, l = scale_reduce(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(o, ref_out, rtol=1e-6, atol=1e-6)
    # Against float64 evaluation of the formula.
    lse64 = torch.logsumexp(torch.stack(lses).double(), dim=0)
    out64 = (torch.exp(torch.stack(lses).double() - lse64)[..., None] * torch.stack(outs).double()).sum(0)
    assert rel_err(ref_out, out64) <= FP32_TOL and lse_err(lse64, ref_lse) <= FP32_TOL


def test_scale_reduce_all_neg_inf_rows():
    outs = torch.randn(3, 4, 2, 8)
    lses = torch.randn(3, 4, 2)
    lses[:, 1, :] = float("-inf")
    lses[:, 3, 1] = float("-inf")
    outs[:, 1] = 0.0
    out, lse = scale_reduce(outs, lses)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[1], torch.zeros(2, 8)) and torch.isneginf(lse[1]).all()
    assert torch.equal(out[3, 1], torch.zeros(8)) and torch.isneginf(lse[3, 1])
    assert torch.isfinite(lse[0]).all()
    # A single partial comes back unchanged.
    o1, l1 = scale_reduce([outs[0]], [lses[0]])
    assert torch.equal(o1, outs[0]) and torch.equal(l1, lses[0])


def _valid_args():
    k = torch.zeros(4, 2, 2, 8)
    index = BlockIndex(cu_seqlens_q=torch.tensor([0, 1, 3]), q_positions=torch.tensor([0, 1, 2]),
                       block_tables=torch.tensor([[0], [1]]), block_starts=torch.tensor([[0], [0]]),
                       block_lens=torch.tensor([[1], [2]]))
    return dict(q=torch.zeros(3, 4, 8), k_cache=k, v_cache=k.clone(), index=index)


def _changed(args: dict, change: dict) -> dict:
    """`args` with the tensors in `change` replaced, those named after a BlockIndex field in the index."""
    index_fields = {f.name for f in fields(BlockIndex)}
    index_change = {name: t for name, t in change.items() if name in index_fields}
    rest = {name: t for name, t in change.items() if name not in index_change}
    return {**args, **rest, "index": replace(args["index"], **index_change)}


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.zeros(3, 4)), "q must be"),
    (dict(q=torch.zeros(3, 3, 8)), "multiple of"),
    (dict(q=torch.zeros(3, 4, 16)), "head dim"),
    (dict(v_cache=torch.zeros(4, 2, 2, 4)), "v_cache shape"),
    (dict(k_cache=torch.zeros(4, 2, 8)), "k_cache must be"),
    (dict(q_positions=torch.tensor([0, 1])), "q_positions has 2"),
    (dict(q_positions=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 4])), "end at T=3"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 1, 3]), block_tables=torch.zeros(3, 1, dtype=torch.int64),
          block_starts=torch.zeros(3, 1, dtype=torch.int64), block_lens=torch.zeros(3, 1, dtype=torch.int64)),
     "non-decreasing"),
    (dict(block_tables=torch.tensor([[0]])), "rows"),
    (dict(block_lens=torch.tensor([[1, 0], [2, 0]])), "block_lens shape"),
    (dict(block_lens=torch.tensor([[3], [2]])), "block_lens must be in"),
    (dict(block_tables=torch.tensor([[0], [4]])), "outside"),
    (dict(q=torch.zeros(3, 4, 8, dtype=torch.int32)), "floating-point"),
])
def test_input_validation(change, message):
    args = _changed(_valid_args(), change)
    with pytest.raises((ValueError, TypeError), match=message):
        micro_attention(**args)


def test_scale_reduce_validation():
    with pytest.raises(ValueError, match="at least one"):
        scale_reduce([], [])
    with pytest.raises(ValueError, match="do not match"):
        scale_reduce([torch.zeros(2, 3, 4)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="shape"):
        scale_reduce([torch.zeros(2, 3, 4), torch.zeros(3, 3, 4)], [torch.zeros(2, 3), torch.zeros(3, 3)])


def test_padding_block_ids_are_ignored():
    """Padding entries (len 0) may hold any id, even out of range; valid-slot limits are honoured."""
    args = _valid_args()
    gen = torch.Generator().manual_seed(1)
    args["k_cache"] = torch.randn(4, 2, 2, 8, generator=gen)
    args["v_cache"] = torch.randn(4, 2, 2, 8, generator=gen)
    args["q"] = torch.randn(3, 4, 8, generator=gen)
    base_out, base_lse = micro_attention(**args)
    args["index"] = replace(args["index"], block_tables=torch.tensor([[99, 0], [1, -5]]),
                            block_starts=torch.tensor([[0, 0], [0, 0]]), block_lens=torch.tensor([[0, 1], [2, 0]]))
    out, lse = micro_attention(**args)
    assert torch.equal(out, base_out) and torch.equal(lse, base_lse)
    # Query 0 of sequence 0 sees exactly key 0 of block 0: softmax of one key is that value.
    torch.testing.assert_close(out[0], args["v_cache"][0, 0].repeat_interleave(2, dim=0), rtol=1e-6, atol=1e-6)
    assert math.isclose(lse[0, 0].item(), (args["q"][0, 0] @ args["k_cache"][0, 0, 0]).item() * 8 ** -0.5, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# GPU: the Triton kernel against the PyTorch implementation (skipped without CUDA + Triton).

def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")


def _on_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: BlockIndex):
    """A call's inputs (as `call_inputs` gives them), moved to the GPU."""
    return q.cuda(), k_cache.cuda(), v_cache.cuda(), index.to("cuda")


def _to_cuda_attention(*args, scale=None):
    out, lse = micro_attention(*_on_cuda(*args), scale=scale)
    assert out.is_cuda and lse.is_cuda
    return out.cpu(), lse.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(work=workloads())
def test_gpu_distributed_equals_monolithic(dtype, work):
    _gpu()
    check_against_reference(work, dtype, attention=_to_cuda_attention)


@pytest.mark.gpu
@pytest.mark.parametrize("ctx,nq,hq,hkv,d,bs", [
    (5000, 1, 32, 8, 128, 16),     # long decode: split-KV path
    (2000, 300, 8, 2, 64, 16),     # prefill chunk at an offset
    (700, 1, 64, 1, 80, 32),       # MQA, head dim not a power of two
    (900, 17, 4, 4, 96, 7),        # MHA, odd block size
])
def test_gpu_matches_cpu(ctx, nq, hq, hkv, d, bs):
    _gpu()
    gen = torch.Generator().manual_seed(ctx + nq)
    seqs = [make_seq(gen, hq, hkv, d, bs, ctx, nq, bs, torch.float32),
            make_seq(gen, hq, hkv, d, bs, ctx // 3 + 1, 1, 0, torch.float32)]
    inst = distribute(gen, seqs, 1, hkv, d, bs, torch.float32)[0]
    args = call_inputs(seqs, inst, torch.float32, pad_blocks=2)
    cpu_out, cpu_lse = micro_attention(*args)
    gpu_out, gpu_lse = _to_cuda_attention(*args)
    assert rel_err(gpu_out, cpu_out.double()) <= FP32_TOL
    assert lse_err(gpu_lse, cpu_lse.double()) <= FP32_TOL
    # Triton's result also goes through the torch implementation on the same device.
    torch_out, _ = micro_attention_torch(*_on_cuda(*args))
    assert rel_err(gpu_out, torch_out.cpu().double()) <= FP32_TOL


@pytest.mark.gpu
def test_gpu_no_key_and_scale_reduce():
    _gpu()
    k_cache = torch.randn(4, 4, 1, 16, device="cuda")
    q = torch.randn(3, 2, 16, device="cuda")
    cu = torch.tensor([0, 2, 3], device="cuda")
    q_pos = torch.tensor([3, 8, 5], device="cuda")
    tables = torch.tensor([[2, 0], [0, 0]], device="cuda")
    starts = torch.tensor([[4, 0], [0, 0]], device="cuda")
    lens = torch.tensor([[4, 0], [0, 0]], device="cuda")
    out, lse = micro_attention(q, k_cache, k_cache.clone(), BlockIndex(cu, q_pos, tables, starts, lens))
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isneginf(lse[2]).all() and torch.isfinite(lse[1]).all()
    merged, mlse = scale_reduce([out, out], [lse, lse])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(mlse[1], lse[1] + math.log(2))


@pytest.mark.gpu
def test_gpu_scale_reduce_matches_formula():
    _gpu()
    gen = torch.Generator().manual_seed(4)
    outs = torch.randn(5, 33, 6, 80, generator=gen)
    lses = torch.randn(5, 33, 6, generator=gen) * 20
    lses[:, 3] = float("-inf")
    lses[1:, 7, 2] = float("-inf")
    cpu_out, cpu_lse = scale_reduce(outs, lses)
    gpu_out, gpu_lse = scale_reduce(list(outs.cuda().unbind(0)), list(lses.cuda().unbind(0)))
    assert not torch.isnan(gpu_out).any() and torch.isneginf(gpu_lse[3]).all()
    assert torch.equal(gpu_out[3].cpu(), torch.zeros(6, 80))
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_lse.cpu(), cpu_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix_blocks, nq", [(0, 16), (3, 13), (2, 1 + 8 * 3)])
def test_prefill_chunk_at_block_boundary_runs_causal_and_exact(prefix_blocks, nq):
    """A prefill chunk whose queries start a block: its own keys go through the kernel's causal
    mode (the last block may be partly filled, so there are more key slots than queries)."""
    gen = torch.Generator().manual_seed(nq)
    hkv, g, d, bs = 2, 3, 16, 8
    ctx = prefix_blocks * bs + nq
    seq = make_seq(gen, hkv * g, hkv, d, bs, ctx, nq, 0, torch.float32)
    seq.segments = [(p, min(bs, ctx - p)) for p in range(0, ctx, bs)]  # full blocks, in order
    num_blocks = len(seq.segments) + 2
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    ids = torch.randperm(num_blocks, generator=gen)[: len(seq.segments)].tolist()
    for bid, (start, n) in zip(ids, seq.segments):
        k_cache[bid, :n] = seq.k[start:start + n].float()
        v_cache[bid, :n] = seq.v[start:start + n].float()
    inst = Instance(k_cache, v_cache, [[(bid, start, n) for bid, (start, n) in zip(ids, seq.segments)]])
    args = call_inputs([seq], inst, torch.float32)
    plan = plan_module.plan_micro_attention(*args)
    assert plan.groups[0].chunks[-1].causal == (nq > 1)
    out, lse = micro_attention(*args, scale=d ** -0.5)
    ref_out, ref_lse = reference(seq, d ** -0.5)
    assert rel_err(out, ref_out) <= FP32_TOL
    assert lse_err(lse, ref_lse) <= FP32_TOL
