"""MicroAttention on CUDA: a flash-decoding style Triton kernel over paged, scattered KV blocks.

Same interface and semantics as `dist_attention.micro_attention` (which dispatches here for CUDA
tensors). One program handles (sequence, KV split, query block, KV head): its rows are the
G query heads that share the KV head times BLOCK_Q query tokens, so each key tile is loaded
once for the whole group (GQA/MQA). The program walks the sequence's listed blocks as one flat
range of slots (block j = n // block_size, slot = n % block_size, so blocks may be listed in any
order and at any position), masks invalid and future slots, and keeps an online softmax. When
there are too few (sequence, query block, head) programs to fill the GPU (long-context decode),
the slot range is split over several programs, each writing a partial (out, lse), which
ScaleReduce merges: the same LSE algebra DistAttention uses across instances.

All arithmetic is float32 (IEEE dot products, no TF32), whatever the input dtype, so results
match the CPU path to float32 rounding. Triton is imported lazily by the dispatcher: CPU
machines never need it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite_llm.kernels.attention_inputs import BlockIndex, validate_inputs

__all__ = ["triton_micro_attention", "triton_scale_reduce"]

# Rows (query heads x query tokens) per program for decode-like and prefill-like calls.
_DECODE_ROWS = 16
_PREFILL_ROWS = 64
# Key slots per inner iteration.
_BLOCK_N = 64
# Split the KV range until about this many programs per streaming multiprocessor run.
_PROGRAMS_PER_SM = 4
# Do not split a sequence's KV into pieces smaller than this many slots.
_MIN_SLOTS_PER_SPLIT = 256
# bf16/fp16 inputs: tensor-core dots with float32 accumulation (exact 16-bit products, and p
# split into three 16-bit pieces), instead of float32 FMA dots on up-converted inputs.
_TENSOR_CORES = True


# Sizes that vary call to call are not specialised on, so shapes do not multiply compilations.
@triton.jit(do_not_specialize=["block_size", "table_width", "slots_per_split", "num_splits"])
def _micro_attention_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, qpos_ptr, bt_ptr, starts_ptr, lens_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt_s, stride_bt_b,
    stride_op, stride_ot, stride_oh, stride_od,
    stride_lp, stride_lt, stride_lh,
    scale, block_size, table_width, slots_per_split, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TENSOR_CORES: tl.constexpr,
):
    pid_seq_split = tl.program_id(0)
    pid_qblock = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq = pid_seq_split // num_splits
    split = pid_seq_split % num_splits

    q_begin = tl.load(cu_ptr + seq)
    q_end = tl.load(cu_ptr + seq + 1)
    first_token = q_begin + pid_qblock * BLOCK_Q
    if first_token >= q_end:
        return

    rows = tl.arange(0, GROUP_PAD * BLOCK_Q)
    group_idx = rows // BLOCK_Q
    token = first_token + rows % BLOCK_Q
    row_valid = (group_idx < GROUP) & (token < q_end)
    head = kv_head * GROUP + group_idx
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_ptrs = q_ptr + token[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if not TENSOR_CORES:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + token, mask=row_valid, other=0)

    m_i = tl.full([GROUP_PAD * BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD * BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD * BLOCK_Q, BLOCK_D], dtype=tl.float32)

    total_slots = table_width * block_size
    slot_begin = split * slots_per_split
    slot_end = tl.minimum(slot_begin + slots_per_split, total_slots)
    table_row = bt_ptr + seq.to(tl.int64) * stride_bt_s
    starts_row = starts_ptr + seq.to(tl.int64) * stride_bt_s
    lens_row = lens_ptr + seq.to(tl.int64) * stride_bt_s
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(slot_begin, slot_end, BLOCK_N):
        n = n0 + cols
        in_range = n < slot_end
        entry = n // block_size
        slot = n % block_size
        block_len = tl.load(lens_row + entry * stride_bt_b, mask=in_range, other=0)
        key_valid = in_range & (slot < block_len)
        block_id = tl.load(table_row + entry * stride_bt_b, mask=key_valid, other=0).to(tl.int64)
        key_pos = tl.load(starts_row + entry * stride_bt_b, mask=key_valid, other=0) + slot

        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            k_ptr + block_id[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :] * stride_kd,
            mask=kv_mask, other=0.0,
        )
        if TENSOR_CORES:
            # 16-bit products are exact in float32 and the tensor cores accumulate in float32.
            scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale
        else:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        visible = row_valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= qpos[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # A row that has seen nothing yet keeps max -inf: use 0 as its base so exp gives 0, not NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_base[:, None])
        alpha = tl.exp(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + block_id[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :] * stride_vd,
            mask=kv_mask, other=0.0,
        )
        if TENSOR_CORES:
            # p (float32) = hi + mid/2^11 + lo/2^22 in three 16-bit pieces (scaled so fp16 does not
            # underflow): three tensor-core products keep p's full 24-bit precision.
            p_hi = p.to(v.dtype)
            rest = (p - p_hi.to(tl.float32)) * 2048.0
            p_mid = rest.to(v.dtype)
            p_lo = ((rest - p_mid.to(tl.float32)) * 2048.0).to(v.dtype)
            pv = tl.dot(p_hi, v, out_dtype=tl.float32)
            pv += tl.dot(p_mid, v, out_dtype=tl.float32) * (1.0 / 2048.0)
            pv += tl.dot(p_lo, v, out_dtype=tl.float32) * (1.0 / 4194304.0)
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    out_ptrs = (out_ptr + split * stride_op + token[:, None].to(tl.int64) * stride_ot
                + head[:, None] * stride_oh + dims[None, :] * stride_od)
    tl.store(out_ptrs, out, mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + split * stride_lp + token.to(tl.int64) * stride_lt + head * stride_lh, lse, mask=row_valid)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def triton_micro_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: BlockIndex,
                           scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`micro_attention` for CUDA tensors; returns float32 (out [T, Hq, D], lse [T, Hq])."""
    shape = validate_inputs(q, k_cache, v_cache, index, check_values=False)
    for name, t in index.named_tensors().items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if scale is None:
        scale = shape.head_dim ** -0.5
    t_total, hq, d = shape.num_tokens, shape.num_q_heads, shape.head_dim
    if t_total == 0 or shape.num_seqs == 0 or shape.max_blocks == 0:
        return (torch.zeros(t_total, hq, d, dtype=torch.float32, device=q.device),
                torch.full((t_total, hq), float("-inf"), dtype=torch.float32, device=q.device))

    cu = index.cu_seqlens_q.to(torch.int64).contiguous()
    q_positions = index.q_positions.to(torch.int64).contiguous()
    block_tables = index.block_tables.to(torch.int64).contiguous()
    block_starts = index.block_starts.to(torch.int64).contiguous()
    block_lens = index.block_lens.to(torch.int64).contiguous()

    group = shape.group_size
    group_pad = _next_pow2(group)
    max_q = int((cu[1:] - cu[:-1]).max())  # one host sync: sizes the grid
    rows = _DECODE_ROWS if max_q * group_pad <= _DECODE_ROWS else _PREFILL_ROWS
    rows = max(rows, group_pad)
    block_q = rows // group_pad
    num_qblocks = triton.cdiv(max(max_q, 1), block_q)

    tensor_core_dtype = (q.dtype == k_cache.dtype == v_cache.dtype) and q.dtype in (torch.bfloat16, torch.float16)
    total_slots = shape.max_blocks * shape.block_size
    base_programs = shape.num_seqs * num_qblocks * shape.num_kv_heads
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    num_splits = 1
    if base_programs < _PROGRAMS_PER_SM * sms:
        num_splits = min(triton.cdiv(_PROGRAMS_PER_SM * sms, base_programs),
                         max(1, total_slots // _MIN_SLOTS_PER_SPLIT))
    slots_per_split = triton.cdiv(triton.cdiv(total_slots, num_splits), _BLOCK_N) * _BLOCK_N
    num_splits = triton.cdiv(total_slots, slots_per_split)

    out = torch.empty(num_splits, t_total, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_splits, t_total, hq, dtype=torch.float32, device=q.device)
    grid = (shape.num_seqs * num_splits, num_qblocks, shape.num_kv_heads)
    _micro_attention_kernel[grid](
        q, k_cache, v_cache, cu, q_positions, block_tables, block_starts, block_lens, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        float(scale), shape.block_size, shape.max_blocks, slots_per_split, num_splits,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q,
        HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), BLOCK_N=_BLOCK_N,
        TENSOR_CORES=_TENSOR_CORES and tensor_core_dtype,
        num_warps=4 if rows <= 16 else 8,
    )
    if num_splits == 1:
        return out[0], lse[0]
    return triton_scale_reduce(out, lse)


@triton.jit
def _scale_reduce_kernel(
    outs_ptr, lses_ptr, out_ptr, lse_ptr, num_parts, num_rows,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    max_lse = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for p in range(num_parts):
        part = tl.load(lses_ptr + p * num_rows + rows64, mask=row_valid, other=float("-inf"))
        max_lse = tl.maximum(max_lse, part)
    base = tl.where(max_lse == float("-inf"), 0.0, max_lse)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for p in range(num_parts):
        part = tl.load(lses_ptr + p * num_rows + rows64, mask=row_valid, other=float("-inf"))
        weight = tl.exp(part - base)
        total += weight
        o = tl.load(outs_ptr + (p * num_rows + rows64[:, None]) * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * o
    seen = total > 0.0
    safe_total = tl.where(seen, total, 1.0)
    tl.store(out_ptr + rows64[:, None] * HEAD_DIM + dims[None, :], acc / safe_total[:, None], mask=mask)
    tl.store(lse_ptr + rows64, tl.where(seen, base + tl.log(safe_total), float("-inf")), mask=row_valid)


def triton_scale_reduce(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaleReduce of stacked CUDA partials `outs [P, T, H, D]`, `lses [P, T, H]` in one launch."""
    parts, t_total, heads, d = outs.shape
    outs = outs.to(torch.float32).contiguous()
    lses = lses.to(torch.float32).contiguous()
    out = torch.empty(t_total, heads, d, dtype=torch.float32, device=outs.device)
    lse = torch.empty(t_total, heads, dtype=torch.float32, device=outs.device)
    num_rows = t_total * heads
    if num_rows == 0:
        return out, lse
    block_d = max(16, _next_pow2(d))
    block_r = max(1, min(64, 4096 // block_d))
    _scale_reduce_kernel[(triton.cdiv(num_rows, block_r),)](
        outs, lses, out, lse, parts, num_rows, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out, lse
