"""MicroAttention on CPU (and any device without Triton): a per-step plan, run once per layer.

Everything a `micro_attention` call derives from its index tensors (which sequences are padded
into one batch, which blocks each KV chunk gathers, the visibility masks, where the rows go
back) is the same for every layer of a step. `plan_micro_attention` computes it once, with all
host synchronisations; `run_micro_attention_plan` then costs, per layer, one gather of K and V
per chunk and one attention call per chunk, with no Python loop over sequences.

Attention itself is torch's fused CPU flash-attention kernel
(`aten::_scaled_dot_product_flash_attention_for_cpu`), which also returns the log-sum-exp that
ScaleReduce needs. It reads the gathered KV once, in tiles, where the hand-written batched
matmuls + softmax it replaced made several passes over the score matrix (measured 2-4x slower).
The G query heads sharing a KV head become G x Q rows of one attention call, so GQA needs no
repeated K/V. Gathered blocks land in a per-thread workspace reused across layers and steps:
a fresh multi-MB tensor per layer was measured to cost more in page faults than the gather.

Sequences with at most `_NATIVE_MAX_QUERIES` queries (decode) skip all that when the native
kernel is built (`native_attention.py`): memory-bound, they gain most from reading the blocks
where they lie, and the plan just hands it their index tensors.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from infinite_llm.kernels import native_attention
from infinite_llm.kernels.attention_inputs import BlockIndex, MicroAttentionInputs, validate_inputs

# Gathered K (or V) elements per KV chunk (8 MiB in float32). Measured on 2 cores: smaller
# chunks (cache-resident, 0.25-4 MiB) lose more in per-call overhead than they save in traffic;
# this bounds the workspace while long contexts still run in few calls.
_KV_CHUNK_ELEMS = 1 << 21
# Key slots per sequence per chunk at least: shorter calls are dominated by per-call overhead.
# With the element budget above this also caps how many sequences are batched together.
_MIN_CHUNK_SLOTS = 256
# Mask elements (rows x key slots) per masked chunk: bounds memory for long prefill chunks.
_MASK_CHUNK_ELEMS = 1 << 21
# A group of padded sequences may cost this many (query, key-slot) pairs more than its sequences
# would cost unpadded before it is split: below that, one more call costs more in per-call
# overhead than the padding wastes.
_GROUP_SLACK_PAIRS = 1 << 14
# Sequences with at most this many queries (decode) go to the native kernel when it is built:
# it reads their blocks in place, but computes row by row, so it is for memory-bound calls only.
_NATIVE_MAX_QUERIES = 4

_workspace = threading.local()  # per thread: instances in one process step on their own threads


@dataclass
class _Chunk:
    """One attention call: the blocks it gathers and who may see which key."""

    block_ids: torch.Tensor  # [Sg * blocks] pool ids, sequence-major
    mask: Optional[torch.Tensor]  # additive [Sg, 1, 1 or G*Qm, C]; None: every row sees every key
    empty: Optional[torch.Tensor]  # [Sg, 1, G*Qm] rows that see no key here (the kernel says lse 0)
    # Key j is visible to query i iff j <= i (a prefill chunk's own keys): the kernel then skips
    # the masked half instead of computing it and adding -inf.
    causal: bool = False


@dataclass
class _Group:
    """Sequences padded into one batch: Sg sequences x Qm query rows."""

    num_seqs: int
    max_q: int
    rows: torch.Tensor  # [Sg * Qm] rows of q; padding rows repeat a real row
    real: Optional[torch.Tensor]  # positions in rows of the real rows; None: all real
    dest: torch.Tensor  # the real rows' rows of the output
    chunks: list[_Chunk]


@dataclass
class _NativeCall:
    """The sequences the native kernel serves, with the index tensors it reads (int64, contiguous)."""

    lib: ctypes.CDLL
    seqs: list[int]
    index: tuple[torch.Tensor, ...]  # row_start [S'], row_count [S'], q_positions [T], tables, starts, lens
    num_rows: int


@dataclass
class MicroAttentionPlan:
    """What `micro_attention` derives from its index tensors, for every layer of a step."""

    shape: MicroAttentionInputs
    groups: list[_Group]
    identity: bool  # one group, all rows real and in order: its result is the output as is
    native: Optional[_NativeCall] = None


def plan_micro_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         index: BlockIndex) -> MicroAttentionPlan:
    """Validate the inputs and plan the calls (same arguments and semantics as `micro_attention`)."""
    shape = validate_inputs(q, k_cache, v_cache, index, check_values=not q.is_cuda)
    if shape.num_tokens == 0 or shape.num_seqs == 0 or shape.max_blocks == 0:
        return MicroAttentionPlan(shape, [], False)
    cu = index.cu_seqlens_q.to(torch.int64)
    num_q = (cu[1:] - cu[:-1]).tolist()
    num_blocks = (index.block_lens > 0).sum(dim=1).tolist()
    native = _plan_native(q, k_cache, cu, index, num_q, num_blocks, shape)
    for s in native.seqs if native is not None else []:
        num_q[s] = 0  # not grouped below
    groups = _plan_groups(cu, index, num_q, num_blocks, shape)
    identity = (
        len(groups) == 1 and groups[0].real is None and groups[0].rows.numel() == shape.num_tokens
        and bool((groups[0].dest == torch.arange(shape.num_tokens, device=q.device)).all())
    )
    return MicroAttentionPlan(shape, groups, identity, native)


def _plan_groups(cu: torch.Tensor, index: BlockIndex, num_q: list[int], num_blocks: list[int],
                 shape: MicroAttentionInputs) -> list[_Group]:
    """The torch path's padded batches, for the sequences with num_q > 0 (`cu`: the index's
    cu_seqlens_q as int64)."""
    if not any(num_q):
        return []
    tables, starts, lens = _listed_blocks_first(index.block_tables, index.block_starts, index.block_lens)
    max_group = max(1, _KV_CHUNK_ELEMS // (_MIN_CHUNK_SLOTS * shape.num_kv_heads * shape.head_dim))
    q_positions = index.q_positions.to(torch.int64)
    return [
        _plan_group(group, cu, q_positions, num_q, num_blocks, tables, starts, lens, shape)
        for group in _group_sequences(num_q, num_blocks, shape.block_size, max_group)
    ]


def _plan_native(q: torch.Tensor, k_cache: torch.Tensor, cu: torch.Tensor, index: BlockIndex, num_q: list[int],
                 num_blocks: list[int], shape: MicroAttentionInputs) -> Optional[_NativeCall]:
    """The native kernel's share: sequences with work and few queries (none if it is not built;
    `cu`: the index's cu_seqlens_q as int64)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    lib = native_attention.library()
    if lib is None or not native_attention.supports(lib, shape.num_q_heads, shape.num_kv_heads, shape.head_dim):
        return None
    seqs = [s for s, (n, b) in enumerate(zip(num_q, num_blocks)) if 0 < n <= _NATIVE_MAX_QUERIES and b > 0]
    if not seqs:
        return None
    long = lambda t: t.to(torch.int64).contiguous()  # noqa: E731
    counts = [num_q[s] for s in seqs]
    per_seq = (index.block_tables, index.block_starts, index.block_lens)
    # Padding entries (len 0) keep whatever id they hold: the kernel never reads their blocks.
    if len(seqs) == len(num_q):  # every sequence (a decode batch): the tables as they are
        arrays = (cu[:-1], cu[1:] - cu[:-1], long(index.q_positions), *(long(t) for t in per_seq))
    else:
        idx = torch.tensor(seqs, dtype=torch.int64)
        arrays = (long(cu[idx]), torch.tensor(counts, dtype=torch.int64), long(index.q_positions),
                  *(long(t[idx]) for t in per_seq))
    return _NativeCall(lib, seqs, arrays, sum(counts))


def _listed_blocks_first(tables: torch.Tensor, starts: torch.Tensor,
                         lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's listed blocks moved to the front (stable, so any order is kept), so a group of
    sequences can be cut to the most listed blocks among them; padding entries point at block 0
    (any id is fine: their slots are masked)."""
    tables, starts, lens = tables.to(torch.int64), starts.to(torch.int64), lens.to(torch.int64)
    order = torch.argsort((lens <= 0).to(torch.int8), dim=1, stable=True)
    tables, starts, lens = (torch.gather(t, 1, order) for t in (tables, starts, lens))
    return torch.where(lens > 0, tables, torch.zeros_like(tables)), starts, lens


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


def _plan_group(group: list[int], cu: torch.Tensor, q_positions: torch.Tensor, num_q: list[int],
                num_blocks: list[int], tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                shape: MicroAttentionInputs) -> _Group:
    device = cu.device
    sg, max_q, max_b = len(group), max(num_q[s] for s in group), max(num_blocks[s] for s in group)
    seq_idx = torch.tensor(group, dtype=torch.int64, device=device)
    q_off = torch.arange(max_q, device=device)
    rows = cu[seq_idx][:, None] + q_off
    row_valid = q_off < torch.tensor([num_q[s] for s in group], device=device)[:, None]   # [Sg, Qm]
    rows = torch.where(row_valid, rows, rows[:, :1])
    qpos = q_positions[rows]
    tables, starts, lens = tables[seq_idx, :max_b], starts[seq_idx, :max_b], lens[seq_idx, :max_b]
    # A block needs no mask if every real row of every sequence in the group sees all its slots.
    lowest = torch.where(row_valid, qpos, torch.full_like(qpos, 1 << 62)).amin(dim=1)     # [Sg]
    full = (lens == shape.block_size) & (starts + shape.block_size - 1 <= lowest[:, None])
    first_masked = int((~full.all(dim=0)).to(torch.int8).argmax()) if not bool(full.all()) else max_b
    bs, hkv, d = shape.block_size, shape.num_kv_heads, shape.head_dim
    per_chunk = max(_KV_CHUNK_ELEMS // (sg * bs * hkv * d), _MIN_CHUNK_SLOTS // bs, 1)
    per_masked = max(1, min(per_chunk, _MASK_CHUNK_ELEMS // (sg * shape.group_size * max_q * bs)))
    causal = _is_causal_tail(starts[0, first_masked:], lens[0, first_masked:], qpos[0], shape) if sg == 1 else False
    bounds = _group_bounds(first_masked, max_b, per_chunk, per_masked, causal)
    chunks = [
        _plan_chunk(tables[:, b0:b1], starts[:, b0:b1], lens[:, b0:b1], qpos, row_valid, b1 <= first_masked, shape)
        for b0, b1 in (bounds[:-1] if causal else bounds)
    ]
    if causal:  # the kernel masks it itself
        chunks.append(_Chunk(tables[:, first_masked:].reshape(-1), None, None, causal=True))
    real = None if bool(row_valid.all()) else row_valid.reshape(-1).nonzero().squeeze(1)
    flat_rows = rows.reshape(-1)
    dest = flat_rows if real is None else flat_rows[real]
    return _Group(sg, max_q, flat_rows, real, dest, chunks)


def _is_causal_tail(starts: torch.Tensor, lens: torch.Tensor, qpos: torch.Tensor, shape: MicroAttentionInputs) -> bool:
    """Whether one sequence's blocks from the first masked one on are exactly the keys of its
    queries' own positions, in order (a prefill chunk starting at a block boundary), and few
    enough to repeat for each query head: then that part is plain causal attention."""
    n, bs = starts.numel(), shape.block_size
    if n == 0 or qpos.numel() < 2 or n * bs * shape.num_q_heads * shape.head_dim > _KV_CHUNK_ELEMS:
        return False
    first = int(qpos[0])
    expected = first + bs * torch.arange(n, device=starts.device)
    return (
        int(starts[0]) == first
        and bool((starts == expected).all())
        and bool((lens[:-1] == bs).all())
        and bool((qpos == first + torch.arange(qpos.numel(), device=qpos.device)).all())
        and int(starts[-1] + lens[-1]) == int(qpos[-1]) + 1
    )


def _group_bounds(first_masked: int, max_b: int, per_chunk: int, per_masked: int,
                  causal: bool) -> list[tuple[int, int]]:
    """The group's chunks: all-visible blocks, then masked ones (or one causal chunk)."""
    if per_masked == per_chunk and not causal:
        # Masks are cheap here (decode): chunk the whole range alike, so that a decode's last,
        # partly filled block joins the chunk before it instead of costing a gather, a call and
        # a merge of its own.
        return _chunk_bounds(0, max_b, per_chunk)
    masked = [(first_masked, max_b)] if causal else _chunk_bounds(first_masked, max_b, per_masked)
    return _chunk_bounds(0, first_masked, per_chunk) + masked


def _chunk_bounds(b0: int, b1: int, per_chunk: int) -> list[tuple[int, int]]:
    """[b0, b1) in chunks of `per_chunk` blocks; a short tail joins the chunk before it."""
    bounds = [(b, min(b1, b + per_chunk)) for b in range(b0, b1, per_chunk)]
    if len(bounds) > 1 and 4 * (bounds[-1][1] - bounds[-1][0]) < per_chunk:
        bounds[-2:] = [(bounds[-2][0], b1)]
    return bounds


def _plan_chunk(tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, qpos: torch.Tensor,
                row_valid: torch.Tensor, all_visible: bool, shape: MicroAttentionInputs) -> _Chunk:
    block_ids = tables.reshape(-1)
    if all_visible:
        return _Chunk(block_ids, None, None)
    sg, max_q = qpos.shape
    slot = torch.arange(shape.block_size, device=qpos.device)
    key_pos = (starts[:, :, None] + slot).reshape(sg, -1)                                   # [Sg, C]
    key_valid = (slot < lens[:, :, None]).reshape(sg, -1)
    visible = key_valid[:, None, :] & (key_pos[:, None, :] <= qpos[:, :, None])             # [Sg, Qm, C]
    empty = ~visible.any(dim=-1) & row_valid                                                # [Sg, Qm]
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=qpos.device).masked_fill_(~visible, float("-inf"))
    g = shape.group_size
    # Rows of an attention call are (query head within the KV head's group, query): g-major.
    mask = mask[:, None] if max_q == 1 else mask[:, None, None].expand(-1, 1, g, -1, -1).reshape(sg, 1, g * max_q, -1)
    empty_rows = empty[:, None, None].expand(-1, 1, g, -1).reshape(sg, 1, g * max_q) if bool(empty.any()) else None
    return _Chunk(block_ids, mask, empty_rows)


def run_micro_attention_plan(plan: MicroAttentionPlan, q: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`micro_attention` of `q` over this layer's caches, with the index work done by the plan.

    Returns float32 `out [T, Hq, D]` and `lse [T, Hq]`; rows that see no key get 0 / -inf."""
    shape = plan.shape
    if q.shape != (shape.num_tokens, shape.num_q_heads, shape.head_dim) or k_cache.shape[1:] != (
        shape.block_size, shape.num_kv_heads, shape.head_dim
    ):
        raise ValueError(f"q {tuple(q.shape)} / k_cache {tuple(k_cache.shape)} do not match the plan's {shape}")
    scale = shape.head_dim ** -0.5 if scale is None else scale
    if plan.identity:
        return _attend_group(plan.groups[0], q, k_cache, v_cache, shape, scale)
    out_shape, lse_shape = (shape.num_tokens, shape.num_q_heads, shape.head_dim), (shape.num_tokens, shape.num_q_heads)
    if plan.native is not None and plan.native.num_rows == shape.num_tokens:  # every row written below
        out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros(out_shape, dtype=torch.float32, device=q.device)
        lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    if plan.native is not None:
        native_attention.paged_attention(plan.native.lib, q, k_cache, v_cache, plan.native.index, scale, out, lse)
    for group in plan.groups:
        g_out, g_lse = _attend_group(group, q, k_cache, v_cache, shape, scale)
        if group.real is not None:
            g_out, g_lse = g_out[group.real], g_lse[group.real]
        out.index_copy_(0, group.dest, g_out)
        lse.index_copy_(0, group.dest, g_lse)
    return out, lse


def _attend_group(group: _Group, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  shape: MicroAttentionInputs, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's attention, rows in `group.rows` order: [Sg*Qm, Hq, D], [Sg*Qm, Hq]."""
    sg, qm, hkv, g, d = group.num_seqs, group.max_q, shape.num_kv_heads, shape.group_size, shape.head_dim
    # [Sg, Qm, Hkv, G, D] -> [Sg, Hkv, G*Qm, D]: the G heads sharing a KV head are rows of one call.
    qg = q[group.rows].to(torch.float32).view(sg, qm, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(sg, hkv, g * qm, d)
    acc: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    for chunk in group.chunks:
        # Whole blocks are gathered (one memcpy each); each KV head's keys are then a strided
        # [Sg, Hkv, C, D] view that the kernel reads in place.
        k = _gather(k_cache, chunk.block_ids, "k").view(sg, -1, hkv, d).transpose(1, 2)
        v = _gather(v_cache, chunk.block_ids, "v").view(sg, -1, hkv, d).transpose(1, 2)
        if chunk.causal:
            part = _causal_attention(qg, k, v, g, scale)
        else:
            part = _attention(qg, k, v, chunk.mask, scale)
        if chunk.empty is not None:
            part = (part[0], part[1].masked_fill(chunk.empty, float("-inf")))
        acc = part if acc is None else _merge(acc, part)
    assert acc is not None
    out, lse = acc
    out = out.view(sg, hkv, g, qm, d).permute(0, 3, 1, 2, 4).reshape(sg * qm, hkv * g, d)
    lse = lse.view(sg, hkv, g, qm).permute(0, 3, 1, 2).reshape(sg * qm, hkv * g)
    return out, lse


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, name: str) -> torch.Tensor:
    """cache[block_ids] as float32, written into this thread's reusable buffer `name`."""
    shape = (block_ids.numel(), *cache.shape[1:])
    numel = shape[0] * cache[0].numel()
    buffers: dict = _workspace.__dict__.setdefault("buffers", {})
    # Inference-mode tensors cannot be written outside inference mode (nor the reverse): one
    # buffer per mode.
    key = (name, cache.dtype, cache.device, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=cache.dtype, device=cache.device)
    out = torch.index_select(cache, 0, block_ids, out=buf[:numel].view(shape))
    return out.to(torch.float32)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, R, D], lse [B, H, R]) of q over k/v [B, H, C, D] with an additive mask.

    On CPU torch's flash kernel; elsewhere (CUDA without Triton) the same math in plain ops."""
    if q.device.type == "cpu":
        return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.matmul(torch.exp(scores - safe[..., None]), v), lse


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [Sg, Hkv, G*Qm, D] (G-major rows) over k/v [Sg, Hkv, C, D] whose
    first Qm keys are the queries' own (query i sees keys 0..i; any later slot, none): K/V are
    repeated per query head (the rows of one query then share a row of the causal mask), which
    lets the kernel skip the masked half."""
    sg, hkv, rows, d = q.shape
    qh = q.view(sg, hkv * g, rows // g, d)
    kh, vh = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if q.device.type == "cpu":
        out, lse = _FLASH_CPU(qh, kh, vh, 0.0, True, scale=scale)
    else:
        mask = torch.full((rows // g, kh.shape[2]), float("-inf"), device=q.device).triu_(1)
        out, lse = _attention(qh, kh, vh, mask, scale)
    return out.reshape(sg, hkv, rows, d), lse.reshape(sg, hkv, rows)


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaleReduce of two partials over disjoint keys (the KV chunks of one call)."""
    lse = torch.logaddexp(a[1], b[1])
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both -inf: weights 0
    out = a[0] * torch.exp(a[1] - safe)[..., None] + b[0] * torch.exp(b[1] - safe)[..., None]
    return out, lse
