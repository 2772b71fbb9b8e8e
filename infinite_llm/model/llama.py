"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2) with attention delegated to a backend.

The model runs every non-attention layer for the flattened tokens of one step (the tokens of
several sequences concatenated, T in total) and never sees sequence boundaries: for each layer
it hands the rotary-embedded q and the new k/v to an `AttentionBackend`, which owns the KV
cache and knows which token belongs to which sequence. That is the seam DistAttention plugs
into (see DESIGN.md); `ContiguousAttention` below is the simple reference backend for tests.

Numerics follow HF transformers' LlamaForCausalLM / Qwen2ForCausalLM: RMSNorm in float32,
rotary cos/sin computed in float32 from `position * inv_freq` and cast to the activation dtype,
rotate-half rotary layout, and the same rope-scaling formulas ("linear", "llama3").
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinite_llm.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the T new tokens of this step (rotary applied to q and k).

        Returns the attention output [T, Hq, D]. The backend stores k/v in its own KV cache.
        """
        ...


# --------------------------------------------------------------------------- rotary embeddings


def rope_type_of(rope_scaling: Optional[Mapping]) -> str:
    """The rope type named by an HF rope_scaling dict ("rope_type", or the legacy "type" key)."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def compute_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary inverse frequencies [D/2] in float32, with the config's rope scaling applied."""
    assert config.head_dim is not None
    dim = config.head_dim
    # Built on the CPU explicitly: the model may be constructed under a meta-device context.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(_require(scaling, "factor"))
    if rope_type == "llama3":
        factor = float(_require(scaling, "factor"))
        low_freq_factor = float(_require(scaling, "low_freq_factor"))
        high_freq_factor = float(_require(scaling, "high_freq_factor"))
        old_context_len = float(_require(scaling, "original_max_position_embeddings"))
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed down by `factor`, short ones are kept, the band between
        # is interpolated smoothly (Llama 3.1's context extension).
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _require(scaling: Mapping, key: str):
    if key not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type_of(scaling)!r} needs {key!r}, got {dict(scaling)}")
    return scaling[key]


class RotaryEmbedding(nn.Module):
    """cos/sin tables [positions, D] cached up to the largest position seen, grown by doubling.

    max_position_embeddings can be 1M+ for long-context models; allocating that up front would
    waste memory, so the table covers only what has been asked for so far.
    """

    _MIN_CACHED = 256

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.inv_freq_cpu = compute_inv_freq(config)
        # (cos, sin), float32 [n, D] on the device last used. Replaced as one tuple, never
        # mutated, because in-process instances share one model across threads.
        self._table: Optional[tuple[Tensor, Tensor]] = None

    @property
    def cached_positions(self) -> int:
        return 0 if self._table is None else self._table[0].shape[0]

    def _build(self, need: int, device: torch.device) -> tuple[Tensor, Tensor]:
        n = max(self._MIN_CACHED, self.cached_positions)
        while n < need:
            n *= 2
        inv_freq = self.inv_freq_cpu.to(device)
        # Same arithmetic as HF: float32 position * inv_freq, then cos/sin of [freqs, freqs].
        freqs = torch.arange(n, device=device, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [T, D] in `dtype` for the given absolute positions."""
        if positions.numel() == 0:
            d = 2 * self.inv_freq_cpu.numel()
            empty = torch.zeros(0, d, dtype=dtype, device=positions.device)
            return empty, empty
        lowest, highest = (int(x) for x in torch.stack(positions.aminmax()).tolist())  # one host sync
        if lowest < 0:
            raise ValueError(f"positions must be non-negative, got {lowest}")
        table = self._table
        if table is None or highest >= table[0].shape[0] or table[0].device != positions.device:
            table = self._build(highest + 1, positions.device)
            self._table = table
        cos, sin = table
        return cos[positions].to(dtype), sin[positions].to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (x * cos).add_(_rotate_half(x).mul_(sin))


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the activation dtype (as HF does), scale in the model dtype.
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(input_dtype).mul_(self.weight)


class LlamaAttentionProjections(nn.Module):
    """Fused QKV projection, rotary, delegated attention, output projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.head_dim is not None
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # One matmul instead of three; load_hf_state_dict writes q/k/v into row slices.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)

    def forward(self, layer_idx: int, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Rotary on the q and k heads at once (half the elementwise calls; same values).
        qk_heads = self.num_heads + self.num_kv_heads
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, qk_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        out = attention.attend(layer_idx, q, k, v)
        if out.shape != (t, self.num_heads, self.head_dim):
            raise ValueError(
                f"attention backend returned shape {tuple(out.shape)} for layer {layer_idx}, "
                f"expected {(t, self.num_heads, self.head_dim)}"
            )
        return self.o_proj(out.reshape(t, self.q_size).to(x.dtype))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttentionProjections(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, layer_idx: int, h: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        # In-place where a result is fresh and used once (here and in the norm, rotary and MLP):
        # the same values, but no new [T, ...] buffer per op, whose pages a CPU touches anew.
        h = h.add_(self.self_attn(layer_idx, self.input_layernorm(h), cos, sin, attention))
        return h.add_(self.mlp(self.post_attention_layernorm(h)))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; only 'silu' is implemented")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: Optional[nn.Linear] = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend) -> Tensor:
        """Final hidden states [T, H] (after the last norm) for the T flattened tokens of a step."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must be 1-D of equal length, got {tuple(input_ids.shape)} "
                f"and {tuple(positions.shape)}"
            )
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(i, h, cos, sin, attention)
        return self.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Logits [N, vocab] in float32 for hidden states [N, H]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ----------------------------------------------------------------------- HF weights

    def hf_parameter_targets(self) -> dict[str, Tensor]:
        """HF tensor name -> the (view of the) parameter it is copied into."""
        targets: dict[str, Tensor] = {"model.embed_tokens.weight": self.embed_tokens.weight,
                                      "model.norm.weight": self.norm.weight}
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            q, kv = attn.q_size, attn.kv_size
            for suffix in ("weight", "bias") if attn.qkv_proj.bias is not None else ("weight",):
                fused = getattr(attn.qkv_proj, suffix)
                targets[p + f"self_attn.q_proj.{suffix}"] = fused[:q]
                targets[p + f"self_attn.k_proj.{suffix}"] = fused[q : q + kv]
                targets[p + f"self_attn.v_proj.{suffix}"] = fused[q + kv :]
            targets[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
            if attn.o_proj.bias is not None:
                targets[p + "self_attn.o_proj.bias"] = attn.o_proj.bias
            n = mlp.intermediate_size
            targets[p + "mlp.gate_proj.weight"] = mlp.gate_up_proj.weight[:n]
            targets[p + "mlp.up_proj.weight"] = mlp.gate_up_proj.weight[n:]
            targets[p + "mlp.down_proj.weight"] = mlp.down_proj.weight
            targets[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            targets[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        return targets

    @torch.no_grad()
    def load_hf_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy HF-named tensors (model.layers.0.self_attn.q_proj.weight, ...) into this model.

        Every parameter must be provided exactly once with its HF shape; anything else is an
        error. `lm_head.weight` is ignored for tied-embedding models (some checkpoints store it
        anyway), as are the rotary `inv_freq` buffers older checkpoints carry.
        """
        targets = self.hf_parameter_targets()
        unexpected = []
        for name in tensors.keys():
            if name in targets:
                continue
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
                continue
            unexpected.append(name)
        missing = [name for name in targets if name not in tensors]
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
            if unexpected:
                problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
            raise ValueError("checkpoint does not match the model config; " + "; ".join(problems))
        for name, target in targets.items():
            source = tensors[name]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(source.shape)}, the model config expects "
                    f"{tuple(target.shape)}"
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- reference attention


class ContiguousKVStore:
    """Per-layer, per-sequence contiguous K/V tensors [L, Hkv, D] kept across steps."""

    def __init__(self) -> None:
        self.k: dict[tuple[int, Hashable], Tensor] = {}
        self.v: dict[tuple[int, Hashable], Tensor] = {}

    def append(self, layer_idx: int, seq_id: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        key = (layer_idx, seq_id)
        if key in self.k:
            self.k[key] = torch.cat((self.k[key], k))
            self.v[key] = torch.cat((self.v[key], v))
        else:
            self.k[key], self.v[key] = k.clone(), v.clone()
        return self.k[key], self.v[key]

    def length(self, layer_idx: int, seq_id: Hashable) -> int:
        key = (layer_idx, seq_id)
        return self.k[key].shape[0] if key in self.k else 0

    def drop(self, seq_id: Hashable) -> None:
        for key in [key for key in self.k if key[1] == seq_id]:
            del self.k[key], self.v[key]


class ContiguousAttention:
    """Reference backend: plain causal attention over each sequence's contiguous KV.

    Construct one per step with `[(sequence_id, n_new_tokens), ...]` in the order the tokens are
    concatenated, passing the previous step's `store` to continue those sequences. The new
    tokens of a sequence are assumed to directly follow its cached tokens.
    """

    def __init__(self, seqs: Sequence[tuple[Hashable, int]], store: Optional[ContiguousKVStore] = None):
        ids = [s for s, _ in seqs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a sequence appears twice in one step: {ids}")
        if any(n < 0 for _, n in seqs):
            raise ValueError(f"n_new_tokens must be >= 0, got {list(seqs)}")
        self.seqs = list(seqs)
        self.store = store if store is not None else ContiguousKVStore()

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        total = sum(n for _, n in self.seqs)
        if q.shape[0] != total:
            raise ValueError(f"step has {q.shape[0]} tokens but the sequences given sum to {total}")
        out = torch.empty_like(q)
        start = 0
        for seq_id, n in self.seqs:
            if n == 0:
                continue
            keys, values = self.store.append(layer_idx, seq_id, k[start : start + n], v[start : start + n])
            out[start : start + n] = causal_attention(q[start : start + n], keys, values)
            start += n
        return out


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [n, Hq, D] are the last n of the L tokens whose keys/values k, v [L, Hkv, D] are given."""
    n, hq, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (1.0 / math.sqrt(d))
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)
