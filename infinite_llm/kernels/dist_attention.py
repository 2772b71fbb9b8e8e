"""DistAttention: MicroAttention over paged KV blocks and the exact ScaleReduce merge.

MicroAttention (MA) computes attention of some queries over an arbitrary *subset* of their
sequence's KV blocks (the blocks held by this instance) and returns the partial output together
with its log-sum-exp (LSE). ScaleReduce (SR) merges the partials of the same queries computed
over disjoint block subsets into exactly the monolithic result:

    lse = logsumexp_j lse_j,    out = sum_j exp(lse_j - lse) * out_j

CPU implementation (`attention_plan.py`): sequences with a similar shape are padded into one
batch; the KV axis is processed in chunks bounded in bytes (each chunk's blocks gathered into a
reused, cache-resident buffer) through torch's fused flash-attention kernel, which returns the
LSE, and merged with the same LSE algebra; decode sequences (a few queries each) instead go to a
C kernel that reads their blocks in place (`native_attention.py`), as does ScaleReduce when it
is built. The index work is a plan that a caller attending the same tables at every layer builds
once per step. On CUDA, `micro_attention` dispatches to a
Triton kernel (`triton_attention.py`, imported lazily) with the same semantics.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from infinite_llm.kernels import native_attention
from infinite_llm.kernels.attention_inputs import BlockIndex, MicroAttentionInputs, validate_inputs
from infinite_llm.kernels.attention_plan import MicroAttentionPlan, plan_micro_attention, run_micro_attention_plan

__all__ = [
    "micro_attention", "scale_reduce", "micro_attention_torch", "BlockIndex", "MicroAttentionInputs",
    "validate_inputs", "MicroAttentionPlan", "plan_micro_attention", "run_micro_attention_plan", "merge_partials",
]

def micro_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: BlockIndex,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries of S sequences over the subset of each one's KV blocks that
    `index` lists (see `BlockIndex` for which query sees which key).

    q is [T, Hq, D], the caches [num_blocks, block_size, Hkv, D]. Returns float32
    `out [T, Hq, D]` and `lse [T, Hq]` (natural log); a query that sees no key gets out 0 and
    lse -inf. Query head h uses KV head h // (Hq // Hkv).
    """
    if q.is_cuda and _triton_available():
        from infinite_llm.kernels.triton_attention import triton_micro_attention

        return triton_micro_attention(q, k_cache, v_cache, index, scale)
    return micro_attention_torch(q, k_cache, v_cache, index, scale)


@functools.cache
def _triton_available() -> bool:
    """Whether Triton can be imported (a CUDA machine without it falls back to PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def micro_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: BlockIndex,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of `micro_attention` (runs on any device; used on CPU).

    A caller that attends the same tables once per layer should build the plan once
    (`plan_micro_attention`) and call `run_micro_attention_plan` per layer instead."""
    plan = plan_micro_attention(q, k_cache, v_cache, index)
    return run_micro_attention_plan(plan, q, k_cache, v_cache, scale)


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
    lib = native_attention.library() if out_stack.device.type == "cpu" else None
    if lib is not None:  # likewise on the CPU, where the ops' overhead outweighs a decode's few rows
        return native_attention.scale_reduce(lib, list(out_stack), list(lse_stack))
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


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`scale_reduce` of partials that MicroAttention made (float32, equal shapes, one device),
    without its checks and copies: the per-layer merge of a split step."""
    if len(outs) > 1 and outs[0].device.type == "cpu":
        lib = native_attention.library()
        if lib is not None:
            return native_attention.scale_reduce(lib, outs, lses)
    return scale_reduce(outs, lses)


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
