"""This instance's paged KV pool (tensors; the rManager decides who uses which block)."""

from __future__ import annotations

import torch

from infinite_llm.config import CacheConfig, ModelConfig


class PagedKVCache:
    """Per layer, K and V of shape [num_blocks, block_size, Hkv, D]."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
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
        self.device = device
        layers = model_config.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V [n, Hkv, D] at flat slots (block * block_size + offset)."""
        if slots.numel() == 0:
            return
        # index_copy_ rather than item assignment: half the per-call cost (two calls per layer).
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.v[layer].dtype))

    def block_payload(self, block: int) -> torch.Tensor:
        """All layers' K and V of one block, flattened (what a migration sends), on the CPU."""
        return torch.cat([t[block].reshape(-1) for layer in zip(self.k, self.v) for t in layer]).cpu()

    def load_block(self, block: int, payload: torch.Tensor) -> None:
        offset = 0
        for layer in zip(self.k, self.v):
            for t in layer:
                n = t[block].numel()
                t[block].copy_(payload[offset : offset + n].view_as(t[block]))
                offset += n

    def block_numel(self) -> int:
        return 2 * len(self.k) * self.k[0][0].numel()
