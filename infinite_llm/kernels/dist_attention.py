"""DistAttention: MicroAttention over paged KV blocks and the exact ScaleReduce merge.

MicroAttention (MA) computes attention of some queries over an arbitrary *subset* of their
sequence's KV blocks (the blocks held by this instance) and returns the partial output together
with its log-sum-exp (LSE). ScaleReduce (SR) merges the partials of the same queries computed
over disjoint block subsets into exactly the monolithic result:

    lse = logsumexp_j lse_j,    out = sum_j exp(lse_j - lse) * out_j

CPU implementation (pure PyTorch): sequences with a similar shape are padded into one batch and
attention runs as batched matmuls, one per KV head, in which the G query heads that share the KV
head and all queries of a sequence form the rows (`[S, G * Q, D] @ [S, D, C]`). The KV axis is
processed in chunks whose size is bounded in bytes, merged with the same online-LSE math: memory
stays bounded for 128K-token contexts, and each chunk's gathered blocks stay cache-resident
(measured faster than gathering all keys first). On CUDA, `micro_attention` dispatches to a Triton kernel
(`triton_attention.py`, imported lazily) with the same semantics.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from infinite_llm.kernels.attention_inputs import MicroAttentionInputs, validate_inputs

__all__ = ["micro_attention", "scale_reduce", "micro_attention_torch", "MicroAttentionInputs", "validate_inputs"]

# Gathered K (or V) elements per KV chunk on the CPU path (4 MiB in float32): small enough to
# stay in cache between the gather and the matmul that reads it.
_KV_CHUNK_ELEMS = 1 << 20
# Key slots per sequence per chunk at least: shorter matmuls are dominated by per-call overhead.
# With the element budget above this also caps how many sequences are batched together.
_MIN_CHUNK_SLOTS = 256
# Score-matrix elements per KV chunk (32 MiB float32): bounds memory for long prefill chunks.
_SCORE_CHUNK_ELEMS = 1 << 23
# A group of padded sequences may cost this many (query, key-slot) pairs more than its sequences
# would cost unpadded before it is split: below that, one more batched call costs more in
# per-call overhead than the padding wastes.
_GROUP_SLACK_PAIRS = 1 << 14


def micro_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_positions: torch.Tensor,
    block_tables: torch.Tensor,
    block_starts: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries of S sequences over the listed subset of each one's KV blocks.

    Query t of sequence s sees the key at absolute position p in one of s's listed blocks iff
    the slot is valid (slot < block_lens) and p <= q_positions[t]. Returns float32
    `out [T, Hq, D]` and `lse [T, Hq]` (natural log); a query that sees no key gets out 0 and
    lse -inf. Query head h uses KV head h // (Hq // Hkv).
    """
    if q.is_cuda and _triton_available():
        from infinite_llm.kernels.triton_attention import triton_micro_attention

        return triton_micro_attention(
            q, k_cache, v_cache, cu_seqlens_q, q_positions, block_tables, block_starts, block_lens, scale
        )
    return micro_attention_torch(
        q, k_cache, v_cache, cu_seqlens_q, q_positions, block_tables, block_starts, block_lens, scale
    )


@functools.cache
def _triton_available() -> bool:
    """Whether Triton can be imported (a CUDA machine without it falls back to PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def micro_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_positions: torch.Tensor,
    block_tables: torch.Tensor,
    block_starts: torch.Tensor,
    block_lens: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of `micro_attention` (runs on any device; used on CPU)."""
    shape = validate_inputs(
        q, k_cache, v_cache, cu_seqlens_q, q_positions, block_tables, block_starts, block_lens,
        check_values=not q.is_cuda,
    )
    if scale is None:
        scale = shape.head_dim ** -0.5
    device = q.device
    out = torch.zeros(shape.num_tokens, shape.num_q_heads, shape.head_dim, dtype=torch.float32, device=device)
    lse = torch.full((shape.num_tokens, shape.num_q_heads), float("-inf"), dtype=torch.float32, device=device)
    if shape.num_tokens == 0 or shape.num_seqs == 0 or shape.max_blocks == 0:
        return out, lse

    cu = cu_seqlens_q.to(torch.int64)
    block_tables = block_tables.to(torch.int64)
    block_starts = block_starts.to(torch.int64)
    block_lens = block_lens.to(torch.int64)
    # Move each row's listed blocks to the front (stable, so any order is kept) so that a group
    # of sequences can be cut to the largest number of listed blocks among them.
    used = block_lens > 0
    order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)
    block_tables = torch.gather(block_tables, 1, order)
    block_starts = torch.gather(block_starts, 1, order)
    block_lens = torch.gather(block_lens, 1, order)
    # Padding entries may hold any block id: point them at block 0, their slots are masked.
    block_tables = torch.where(block_lens > 0, block_tables, torch.zeros_like(block_tables))

    num_q = (cu[1:] - cu[:-1]).tolist()
    num_blocks_used = used.sum(dim=1).tolist()
    q_scaled = q.to(torch.float32) * scale

    max_group = max(1, _KV_CHUNK_ELEMS // (_MIN_CHUNK_SLOTS * shape.num_kv_heads * shape.head_dim))
    for group in _group_sequences(num_q, num_blocks_used, shape.block_size, max_group):
        _attend_group(
            group, q_scaled, k_cache, v_cache, cu, q_positions.to(torch.int64), num_q, num_blocks_used,
            block_tables, block_starts, block_lens, shape, out, lse,
        )
    return out, lse


def _group_sequences(num_q: list[int], num_blocks: list[int], block_size: int, max_group: int) -> list[list[int]]:
    """Split the sequences with work into batches whose padding waste is bounded.

    Sequences are sorted by (queries, blocks) descending and cut greedily: a sequence joins the
    current group unless padding the group to it would waste more than the group's real work
    plus a fixed slack (so many small decode sequences become one batch, while a 512-query
    prefill chunk is not padded onto 63 one-query decodes), or the group has `max_group`
    sequences already.
    """
    seqs = [s for s in range(len(num_q)) if num_q[s] > 0 and num_blocks[s] > 0]
    seqs.sort(key=lambda s: (num_q[s], num_blocks[s]), reverse=True)
    groups: list[list[int]] = []
    current: list[int] = []
    real = max_q = max_b = 0
    for s in seqs:
        work = num_q[s] * num_blocks[s] * block_size
        if current:
            padded = (len(current) + 1) * max(max_q, num_q[s]) * max(max_b, num_blocks[s]) * block_size
            if len(current) >= max_group or padded > 2 * (real + work) + _GROUP_SLACK_PAIRS:
                groups.append(current)
                current, real, max_q, max_b = [], 0, 0, 0
        current.append(s)
        real += work
        max_q = max(max_q, num_q[s])
        max_b = max(max_b, num_blocks[s])
    if current:
        groups.append(current)
    return groups


def _attend_group(
    group: list[int],
    q_scaled: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu: torch.Tensor,
    q_positions: torch.Tensor,
    num_q: list[int],
    num_blocks: list[int],
    block_tables: torch.Tensor,
    block_starts: torch.Tensor,
    block_lens: torch.Tensor,
    shape: MicroAttentionInputs,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Attention for one padded batch of sequences; writes their rows of `out` and `lse`."""
    device = q_scaled.device
    hkv, g, d, bs = shape.num_kv_heads, shape.group_size, shape.head_dim, shape.block_size
    sg = len(group)
    max_q = max(num_q[s] for s in group)
    max_b = max(num_blocks[s] for s in group)
    seq_idx = torch.tensor(group, dtype=torch.int64, device=device)

    # Query rows of the batch, [Sg, Qm]; padding rows reuse row 0, see no key and are not
    # written back.
    q_off = torch.arange(max_q, device=device)
    rows = cu[seq_idx][:, None] + q_off
    row_valid = q_off < torch.tensor([num_q[s] for s in group], device=device)[:, None]
    rows = torch.where(row_valid, rows, torch.zeros_like(rows))
    qpos = q_positions[rows]
    # [Sg, Qm, Hkv, G, D] -> [Hkv, Sg, G*Qm, D]: head h = kv_head * G + g.
    qh = q_scaled[rows].view(sg, max_q, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(hkv, sg, g * max_q, d)

    tables = block_tables[seq_idx, :max_b]
    starts = block_starts[seq_idx, :max_b]
    lens = block_lens[seq_idx, :max_b]
    blocks_per_chunk = max(
        1,
        min(
            max(_KV_CHUNK_ELEMS // (sg * bs * hkv * d), _MIN_CHUNK_SLOTS // bs),
            _SCORE_CHUNK_ELEMS // (sg * bs * hkv * g * max_q),
        ),
    )
    slot = torch.arange(bs, device=device)
    acc: Optional[torch.Tensor] = None
    run_max = run_sum = None
    for b0 in range(0, max_b, blocks_per_chunk):
        b1 = min(max_b, b0 + blocks_per_chunk)
        key_pos = (starts[:, b0:b1, None] + slot).reshape(sg, -1)              # [Sg, C]
        key_valid = (slot < lens[:, b0:b1, None]).reshape(sg, -1)              # [Sg, C]
        visible = key_valid[:, None, :] & (key_pos[:, None, :] <= qpos[:, :, None]) & row_valid[:, :, None]
        # Whole blocks are gathered (contiguous memcpy of block_size*Hkv*D elements each) and
        # each KV head's keys are then a strided [Sg, C, D] view that bmm reads in place: this
        # measured 2-3x faster than gathering per-slot rows into a head-major layout.
        block_ids = tables[:, b0:b1].reshape(-1)
        keys = k_cache.index_select(0, block_ids).view(sg, -1, hkv, d).to(torch.float32)
        values = v_cache.index_select(0, block_ids).view(sg, -1, hkv, d).to(torch.float32)
        scores = torch.empty(hkv, sg, g * max_q, keys.shape[1], dtype=torch.float32, device=device)
        for h in range(hkv):
            torch.matmul(qh[h], keys[:, :, h].transpose(-1, -2), out=scores[h])  # [Sg, G*Qm, C]
        scores = scores.view(hkv, sg, g, max_q, -1)
        scores.masked_fill_(~visible[None, :, None], float("-inf"))
        c_max = scores.amax(dim=-1)                                            # [Hkv, Sg, G, Qm]
        c_max_safe = torch.where(torch.isinf(c_max), torch.zeros_like(c_max), c_max)
        scores.sub_(c_max_safe[..., None]).exp_()                              # masked -> 0
        c_sum = scores.sum(dim=-1)
        probs = scores.view(hkv, sg, g * max_q, -1)
        c_acc = torch.empty(hkv, sg, g * max_q, d, dtype=torch.float32, device=device)
        for h in range(hkv):
            torch.matmul(probs[h], values[:, :, h], out=c_acc[h])
        c_acc = c_acc.view(hkv, sg, g, max_q, d)
        if acc is None:
            acc, run_max, run_sum = c_acc, c_max, c_sum
            continue
        # Online merge of this chunk into the running (max, sum, acc) in the LSE algebra.
        new_max = torch.maximum(run_max, c_max)
        new_max_safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        alpha = torch.exp(run_max - new_max_safe)
        beta = torch.exp(c_max - new_max_safe)
        acc = acc * alpha[..., None] + c_acc * beta[..., None]
        run_sum = run_sum * alpha + c_sum * beta
        run_max = new_max
    assert acc is not None and run_max is not None and run_sum is not None
    seen = run_sum > 0
    safe_sum = torch.where(seen, run_sum, torch.ones_like(run_sum))
    g_out = acc / safe_sum[..., None]
    run_max_safe = torch.where(torch.isinf(run_max), torch.zeros_like(run_max), run_max)
    g_lse = torch.where(seen, run_max_safe + torch.log(safe_sum), torch.full_like(run_sum, float("-inf")))
    # [Hkv, Sg, G, Qm, ...] -> [Sg, Qm, Hkv*G, ...] and scatter the real rows back.
    g_out = g_out.permute(1, 3, 0, 2, 4).reshape(sg, max_q, hkv * g, d)
    g_lse = g_lse.permute(1, 3, 0, 2).reshape(sg, max_q, hkv * g)
    real_rows = rows[row_valid]
    out[real_rows] = g_out[row_valid]
    lse[real_rows] = g_lse[row_valid]


def scale_reduce(
    outs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial attentions of the same queries over disjoint key sets, exactly.

    `outs`: P tensors [T, H, D] (or one stacked [P, T, H, D]); `lses`: P tensors [T, H] (or
    [P, T, H]). Returns float32 `out [T, H, D]`, `lse [T, H]` with lse = logsumexp_j lse_j and
    out = sum_j exp(lse_j - lse) * out_j. Rows where every lse_j is -inf give out 0, lse -inf.
    """
    out_stack = _stack("outs", outs, 4)
    lse_stack = _stack("lses", lses, 3)
    if out_stack.shape[0] == 0:
        raise ValueError("scale_reduce needs at least one partial")
    if out_stack.shape[:3] != lse_stack.shape:
        raise ValueError(
            f"partial outputs {tuple(out_stack.shape)} do not match partial LSEs {tuple(lse_stack.shape)}: "
            "expected outs [P, T, H, D] with lses [P, T, H]"
        )
    if out_stack.device != lse_stack.device:
        raise ValueError(f"outs on {out_stack.device} but lses on {lse_stack.device}")
    out_stack = out_stack.to(torch.float32)
    lse_stack = lse_stack.to(torch.float32)
    if out_stack.shape[0] == 1:
        return out_stack[0].clone(), lse_stack[0].clone()
    if out_stack.is_cuda and _triton_available():
        # One kernel launch instead of a dozen elementwise ops: on a GPU SR is launch-bound.
        from infinite_llm.kernels.triton_attention import triton_scale_reduce

        return triton_scale_reduce(out_stack, lse_stack)
    max_lse = lse_stack.amax(dim=0)
    max_safe = torch.where(torch.isinf(max_lse), torch.zeros_like(max_lse), max_lse)
    weights = torch.exp(lse_stack - max_safe)                    # [P, T, H]; -inf partials -> 0
    total = weights.sum(dim=0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, max_safe + torch.log(safe_total), torch.full_like(total, float("-inf")))
    weights = weights / safe_total
    out = out_stack[0] * weights[0][..., None]
    for j in range(1, out_stack.shape[0]):
        out.addcmul_(out_stack[j], weights[j][..., None])
    return out, lse


def _stack(name: str, parts: Sequence[torch.Tensor] | torch.Tensor, ndim: int) -> torch.Tensor:
    if isinstance(parts, torch.Tensor):
        if parts.dim() != ndim:
            raise ValueError(f"stacked {name} must have {ndim} dimensions, got shape {tuple(parts.shape)}")
        return parts
    parts = list(parts)
    if not parts:
        raise ValueError(f"scale_reduce needs at least one partial in {name}")
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() != ndim - 1:
            raise ValueError(f"{name}[{i}] must have {ndim - 1} dimensions, got shape {tuple(p.shape)}")
        if p.shape != parts[0].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(p.shape)}, {name}[0] has {tuple(parts[0].shape)}")
    return torch.stack(parts)
