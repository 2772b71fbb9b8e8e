"""Shape and index checks shared by the MicroAttention implementations (torch and Triton)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MicroAttentionInputs:
    """Validated shapes of a `micro_attention` call."""

    num_tokens: int
    num_q_heads: int
    head_dim: int
    num_kv_heads: int
    block_size: int
    num_seqs: int
    max_blocks: int

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def _check_int_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _host(t: torch.Tensor) -> np.ndarray:
    # numpy on the host: these checks are a dozen tiny reductions, each a few microseconds as
    # torch ops and a fraction of that in numpy (the plan runs them every step).
    return t.detach().cpu().numpy()


def _check_values(cu: np.ndarray, t_total: int, tables: np.ndarray, lens: np.ndarray, block_size: int,
                  num_blocks: int) -> None:
    if cu[0] != 0 or cu[-1] != t_total:
        raise ValueError(f"cu_seqlens_q must start at 0 and end at T={t_total}, got {cu[0]}..{cu[-1]}")
    if cu.size > 1 and (cu[1:] < cu[:-1]).any():
        raise ValueError("cu_seqlens_q must be non-decreasing")
    if lens.size:
        if lens.min() < 0 or lens.max() > block_size:
            raise ValueError(f"block_lens must be in [0, block_size={block_size}]")
        ids = tables[lens > 0]
        if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
            raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) in non-padding entries")


def validate_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_positions: torch.Tensor,
    block_tables: torch.Tensor,
    block_starts: torch.Tensor,
    block_lens: torch.Tensor,
    check_values: bool = True,
) -> MicroAttentionInputs:
    """Check shapes and dtypes (and, if `check_values`, index ranges) and return the sizes.

    Value checks read the index tensors, which on a GPU costs a host synchronisation; the CUDA
    path checks only what it must read anyway.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
    t_total, hq, d = q.shape
    _, block_size, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"head dim of q ({d}) differs from head dim of k_cache ({dk})")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of number of KV heads ({hkv})")
    if block_size == 0:
        raise ValueError("k_cache has block_size 0")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_int_tensor("cu_seqlens_q", cu_seqlens_q, 1)
    _check_int_tensor("q_positions", q_positions, 1)
    _check_int_tensor("block_tables", block_tables, 2)
    _check_int_tensor("block_starts", block_starts, 2)
    _check_int_tensor("block_lens", block_lens, 2)
    if cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q must have S+1 >= 1 entries")
    num_seqs = cu_seqlens_q.numel() - 1
    if q_positions.numel() != t_total:
        raise ValueError(f"q_positions has {q_positions.numel()} entries but q has {t_total} tokens")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but cu_seqlens_q describes {num_seqs} sequences")
    if block_starts.shape != block_tables.shape:
        raise ValueError(f"block_starts shape {tuple(block_starts.shape)} differs from block_tables shape {tuple(block_tables.shape)}")
    if block_lens.shape != block_tables.shape:
        raise ValueError(f"block_lens shape {tuple(block_lens.shape)} differs from block_tables shape {tuple(block_tables.shape)}")
    if check_values:
        _check_values(_host(cu_seqlens_q), t_total, _host(block_tables), _host(block_lens), block_size,
                      k_cache.shape[0])
    return MicroAttentionInputs(t_total, hq, d, hkv, block_size, num_seqs, block_tables.shape[1])
