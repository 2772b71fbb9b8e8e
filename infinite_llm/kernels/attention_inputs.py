"""MicroAttention's block index and the shape and index checks shared by its implementations
(torch and Triton)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


# eq=False: a generated __eq__ would compare the tensors elementwise and fail as a bool; identity is enough.
@dataclass(frozen=True, eq=False)
class BlockIndex:
    """Which KV blocks the queries of S sequences (T query tokens in all) attend to.

    Sequence s lists up to B of its KV blocks, in any order; slot j of listed block b holds the
    key at absolute position block_starts[s, b] + j. Query t of sequence s sees the key at
    absolute position p in one of s's listed blocks iff the slot is valid (j < block_lens[s, b])
    and p <= q_positions[t]. Entries with block_lens 0 are padding and may hold any block id.
    All five are integer tensors (int64 or int32).
    """

    cu_seqlens_q: torch.Tensor  # [S+1]: sequence s's queries are rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q
    q_positions: torch.Tensor  # [T]: each query's absolute position
    block_tables: torch.Tensor  # [S, B]: block ids in the KV pool
    block_starts: torch.Tensor  # [S, B]: absolute position of each listed block's slot 0
    block_lens: torch.Tensor  # [S, B]: valid slots of each listed block, in [0, block_size]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The five tensors by field name (error messages name the field)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> BlockIndex:
        """The same index with every tensor on `device`."""
        return BlockIndex(**{name: t.to(device) for name, t in self.named_tensors().items()})


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
    index: BlockIndex,
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
    _check_int_tensor("cu_seqlens_q", index.cu_seqlens_q, 1)
    _check_int_tensor("q_positions", index.q_positions, 1)
    _check_int_tensor("block_tables", index.block_tables, 2)
    _check_int_tensor("block_starts", index.block_starts, 2)
    _check_int_tensor("block_lens", index.block_lens, 2)
    if index.cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q must have S+1 >= 1 entries")
    num_seqs = index.cu_seqlens_q.numel() - 1
    if index.q_positions.numel() != t_total:
        raise ValueError(f"q_positions has {index.q_positions.numel()} entries but q has {t_total} tokens")
    tables_shape = index.block_tables.shape
    if tables_shape[0] != num_seqs:
        raise ValueError(f"block_tables has {tables_shape[0]} rows but cu_seqlens_q describes {num_seqs} sequences")
    if index.block_starts.shape != tables_shape:
        raise ValueError(f"block_starts shape {tuple(index.block_starts.shape)} differs from block_tables shape {tuple(tables_shape)}")
    if index.block_lens.shape != tables_shape:
        raise ValueError(f"block_lens shape {tuple(index.block_lens.shape)} differs from block_tables shape {tuple(tables_shape)}")
    if check_values:
        _check_values(_host(index.cu_seqlens_q), t_total, _host(index.block_tables), _host(index.block_lens),
                      block_size, k_cache.shape[0])
    return MicroAttentionInputs(t_total, hq, d, hkv, block_size, num_seqs, tables_shape[1])
