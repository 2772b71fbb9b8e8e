"""An instance: model weights, its share of the paged KV cache, and execution of StepPlans.

The instance makes no scheduling decision. Per step it
1. finishes the block copies of the previous plan and starts this plan's in the background
   (migration, the only time KV moves between instances; `BlockCopier`),
2. runs the non-attention layers for the requests homed here,
3. in every layer, writes new tokens' K/V, ships queries to the instances holding blocks of its
   requests, serves guest queries with one batched MicroAttention together with its own, returns
   guest partials, and merges partials with ScaleReduce (`DistributedAttention`),
4. samples the next token of its requests.
"""

from __future__ import annotations

from typing import Optional

import torch

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.control.plan import SampleResult, StepPlan
from infinite_llm.kernels.dist_attention import micro_attention, scale_reduce
from infinite_llm.runtime.block_copier import BlockCopier
from infinite_llm.runtime.sampler import sample_tokens
from infinite_llm.runtime.step_layout import StepLayout, build_step_layout
from infinite_llm.runtime.transport import Transport

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


class PagedKVCache:
    """This instance's KV pool: per layer, K and V of shape [num_blocks, block_size, Hkv, D]."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype, device: torch.device):
        assert model_config.head_dim is not None
        shape = (
            cache_config.num_blocks_per_instance,
            cache_config.block_size,
            model_config.num_key_value_heads,
            model_config.head_dim,
        )
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks_per_instance
        self.dtype = dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_hidden_layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self.k[layer].view(-1, *k.shape[1:])[slots] = k.to(self.k[layer].dtype)
        self.v[layer].view(-1, *v.shape[1:])[slots] = v.to(self.v[layer].dtype)

    def block_payload(self, block: int) -> torch.Tensor:
        """All layers' K and V of one block, flattened (what a migration sends)."""
        return torch.cat([t[block].reshape(-1) for layer in zip(self.k, self.v) for t in layer])

    def load_block(self, block: int, payload: torch.Tensor) -> None:
        offset = 0
        for layer in zip(self.k, self.v):
            for t in layer:
                n = t[block].numel()
                t[block].copy_(payload[offset : offset + n].view_as(t[block]))
                offset += n

    def block_numel(self) -> int:
        return 2 * len(self.k) * self.k[0][0].numel()


class DistributedAttention:
    """The model's attention backend for one step on one instance (see module docstring)."""

    def __init__(self, plan: StepPlan, layout: StepLayout, cache: PagedKVCache, transport: Optional[Transport],
                 num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device):
        self.plan = plan
        self.layout = layout
        self.cache = cache
        self.transport = transport
        self.hq, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.device = device
        if layout.is_distributed and transport is None:
            raise RuntimeError("the plan spreads KV over instances but this instance has no transport")
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self.local_write_rows = as_long(layout.local_write_rows)
        self.local_write_slots = as_long(layout.local_write_slots)
        bs = plan.block_size
        self.guest_write_slots = {
            peer: as_long(
                [
                    self._slot(plan.seqs[r.seq_index], j, bs)
                    for r in seqs
                    for j in r.write_token_indices
                ]
            )
            for peer, seqs in layout.recv_from.items()
        }
        # MicroAttention segments: own sequences with local blocks, then guest sequences by peer.
        self.own_segments = [
            (i, layout.own_row_start[k], len(plan.seqs[i].token_ids))
            for k, i in enumerate(layout.own)
            if i in layout.local_blocks
        ]
        self.guest_order = [(peer, r) for peer in sorted(layout.recv_from) for r in layout.recv_from[peer]]
        seg_seqs = [i for i, _, _ in self.own_segments] + [r.seq_index for _, r in self.guest_order]
        self.num_segments = len(seg_seqs)
        if seg_seqs:
            width = max(len(layout.local_blocks[i].block_ids) for i in seg_seqs)
            tables, starts, lens, cu, qpos = [], [], [], [0], []
            for i in seg_seqs:
                blocks = layout.local_blocks[i]
                pad = width - len(blocks.block_ids)
                tables.append(blocks.block_ids + [0] * pad)
                starts.append(blocks.block_starts + [0] * pad)
                lens.append(blocks.block_lens + [0] * pad)
                work = plan.seqs[i]
                cu.append(cu[-1] + len(work.token_ids))
                qpos.extend(range(work.start_pos, work.end_pos))
            self.block_tables, self.block_starts = as_long(tables), as_long(starts)
            self.block_lens, self.cu_seqlens = as_long(lens), as_long(cu)
            self.q_positions = as_long(qpos)
        # Exact fast path: every own sequence's KV is entirely here and nobody visits.
        self.all_local = not layout.is_distributed and len(self.own_segments) == len(layout.own)
        # Row of each own sequence in this step's tokens (looked up per layer: keep it O(1)).
        self.own_row = dict(zip(layout.own, layout.own_row_start))
        self.own_seg_rows = torch.cat(
            [torch.arange(s, s + n, device=device) for _, s, n in self.own_segments]
        ) if self.own_segments else as_long([])

    @staticmethod
    def _slot(work, j: int, bs: int) -> int:
        pos = work.start_pos + j
        return work.block_table[pos // bs].block * bs + pos % bs

    def _empty_partial(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A partial that contributes nothing to ScaleReduce (out 0, lse -inf) until rows are filled."""
        out = torch.zeros(rows, self.hq, self.d, dtype=torch.float32, device=device)
        lse = torch.full((rows, self.hq), float("-inf"), dtype=torch.float32, device=device)
        return out, lse

    # Message layouts --------------------------------------------------------
    def _query_numel(self, r) -> int:
        return r.num_queries * self.hq * self.d + 2 * len(r.write_token_indices) * self.hkv * self.d

    def _partial_numel(self, r) -> int:
        return r.num_queries * self.hq * (self.d + 1)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout, cache = self.layout, self.cache
        cache.write(layer_idx, self.local_write_slots, k[self.local_write_rows], v[self.local_write_rows])

        guest_q: list[torch.Tensor] = []
        if layout.is_distributed:
            outgoing = {}
            for peer, seqs in layout.send_to.items():
                parts = []
                for r in seqs:
                    row = self.own_row[r.seq_index]
                    parts.append(q[row : row + r.num_queries].reshape(-1))
                    rows = [row + j for j in r.write_token_indices]
                    parts.append(k[rows].reshape(-1))
                    parts.append(v[rows].reshape(-1))
                outgoing[peer] = torch.cat(parts)
            expected = {
                peer: (sum(self._query_numel(r) for r in seqs), q.dtype)
                for peer, seqs in layout.recv_from.items()
            }
            incoming = self.transport.exchange(outgoing, expected)
            for peer in sorted(layout.recv_from):
                flat, offset = incoming[peer], 0
                new_k, new_v = [], []
                for r in layout.recv_from[peer]:
                    nq = r.num_queries * self.hq * self.d
                    nkv = len(r.write_token_indices) * self.hkv * self.d
                    guest_q.append(flat[offset : offset + nq].view(r.num_queries, self.hq, self.d))
                    offset += nq
                    new_k.append(flat[offset : offset + nkv].view(-1, self.hkv, self.d))
                    offset += nkv
                    new_v.append(flat[offset : offset + nkv].view(-1, self.hkv, self.d))
                    offset += nkv
                cache.write(layer_idx, self.guest_write_slots[peer], torch.cat(new_k), torch.cat(new_v))

        local_out = local_lse = None
        if self.num_segments:
            q_ma = torch.cat([q[self.own_seg_rows]] + guest_q) if guest_q else q[self.own_seg_rows]
            local_out, local_lse = micro_attention(
                q_ma, cache.k[layer_idx], cache.v[layer_idx], self.cu_seqlens, self.q_positions,
                self.block_tables, self.block_starts, self.block_lens,
            )
        if self.all_local:
            assert local_out is not None
            return local_out.to(q.dtype)

        num_own_seg_rows = self.own_seg_rows.numel()
        # Own partial from local blocks, scattered to the step's own-token rows.
        t_own = layout.num_own_tokens
        partial_outs, partial_lses = [], []
        if num_own_seg_rows:
            out, lse = self._empty_partial(t_own, q.device)
            out[self.own_seg_rows] = local_out[:num_own_seg_rows]
            lse[self.own_seg_rows] = local_lse[:num_own_seg_rows]
            partial_outs.append(out)
            partial_lses.append(lse)

        if layout.is_distributed:
            replies = {}
            cursor = num_own_seg_rows
            for peer in sorted(layout.recv_from):
                parts = []
                for r in layout.recv_from[peer]:
                    parts.append(local_out[cursor : cursor + r.num_queries].reshape(-1))
                    parts.append(local_lse[cursor : cursor + r.num_queries].reshape(-1))
                    cursor += r.num_queries
                replies[peer] = torch.cat(parts)
            expected = {
                peer: (sum(self._partial_numel(r) for r in seqs), torch.float32)
                for peer, seqs in layout.send_to.items()
            }
            partials = self.transport.exchange(replies, expected)
            for peer in sorted(layout.send_to):
                flat, offset = partials[peer], 0
                out, lse = self._empty_partial(t_own, q.device)
                for r in layout.send_to[peer]:
                    row = self.own_row[r.seq_index]
                    n_out = r.num_queries * self.hq * self.d
                    out[row : row + r.num_queries] = flat[offset : offset + n_out].view(-1, self.hq, self.d)
                    offset += n_out
                    n_lse = r.num_queries * self.hq
                    lse[row : row + r.num_queries] = flat[offset : offset + n_lse].view(-1, self.hq)
                    offset += n_lse
                partial_outs.append(out)
                partial_lses.append(lse)

        if not partial_outs:
            return torch.zeros(t_own, self.hq, self.d, dtype=q.dtype, device=q.device)
        merged, _ = scale_reduce(partial_outs, partial_lses)
        return merged.to(q.dtype)


class InstanceWorker:
    """One instance's data plane. `model` may be shared read-only between in-process instances."""

    def __init__(self, rank: int, model_config: ModelConfig, cache_config: CacheConfig, model: torch.nn.Module,
                 transport: Optional[Transport], device: str = "cpu", seed: int = 0,
                 copy_channel: Optional[Transport] = None):
        self.rank = rank
        self.model_config = model_config
        self.device = torch.device(device)
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.cache = PagedKVCache(model_config, cache_config, self.dtype, self.device)
        self.transport = transport
        # Block migrations run beside the compute on their own channel (runtime/block_copier.py).
        self.copier = BlockCopier(rank, self.cache, copy_channel, self.device)
        self.generator = torch.Generator().manual_seed(seed * 1000003 + rank)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampleResult]:
        # Last step's copies finish first: this plan's tables may read them, and may reuse their
        # sources. Then this step's copies start beside the compute.
        self.copier.start(plan.migrations)
        layout = build_step_layout(plan, self.rank)
        if not layout.own and not layout.recv_from:
            return []
        cfg = self.model_config
        assert cfg.head_dim is not None
        attention = DistributedAttention(
            plan, layout, self.cache, self.transport,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, self.device,
        )
        own = [plan.seqs[i] for i in layout.own]
        if own:
            input_ids = torch.tensor([t for w in own for t in w.token_ids], dtype=torch.long, device=self.device)
            positions = torch.tensor(
                [p for w in own for p in range(w.start_pos, w.end_pos)], dtype=torch.long, device=self.device
            )
        else:
            # A pure host for guests this step: it still takes part in every layer's exchange.
            input_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            positions = torch.zeros(0, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, attention)
        sample_rows = [
            layout.own_row_start[k] + len(w.token_ids) - 1 for k, w in enumerate(own) if w.sample
        ]
        if not sample_rows:
            return []
        sampled = [w for w in own if w.sample]
        logits = self.model.compute_logits(hidden[sample_rows])
        tokens, logprobs = sample_tokens(
            logits, [w.sampling for w in sampled], [w.num_generated for w in sampled], self.generator
        )
        return [
            SampleResult(request_id=w.request_id, token_id=t, logprob=lp)
            for w, t, lp in zip(sampled, tokens, logprobs)
        ]
