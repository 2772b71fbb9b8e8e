"""Configuration dataclasses shared by the control plane and the data plane.

Nothing here imports torch: the control plane and the simulator use these too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

PlacementPolicyName = Literal["static", "striped", "infinite"]


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (mirrors the fields of an HF config.json)."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None
    max_position_embeddings: int = 1 << 20
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # bias on the output projection (Llama's attention_bias; not Qwen2)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int | list[int]] = 2
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of K and V for one token over all layers."""
        assert self.head_dim is not None
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        assert self.head_dim is not None
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        qo = 2 * h * self.num_attention_heads * self.head_dim
        kv = 2 * h * self.num_key_value_heads * self.head_dim
        per_layer = qo + kv + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + h


@dataclass
class CacheConfig:
    """Paged KV cache layout. `num_blocks_per_instance` is the per-instance memory budget."""

    block_size: int = 16
    num_blocks_per_instance: int = 512
    # Fraction of an instance's blocks it may lend to other instances (the rManager's lend cap).
    lend_fraction: float = 0.9
    dtype: str = "float32"


@dataclass
class ClusterConfig:
    """How many instances and how they run."""

    num_instances: int = 1
    # "local": all instances in this process (threads), "ray": one Ray actor per instance.
    backend: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = None  # None: start an embedded local Ray
    device: str = "cpu"
    placement: PlacementPolicyName = "infinite"
    # Rebalancer (infinite policy): the gManager plans every this many seconds; a home moves at
    # most this many tokens' worth of KV per step.
    rebalance_interval_s: float = 0.5
    migration_tokens_per_step: int = 256
    # Instances report to the gManager on this period (from a thread compute cannot block).
    heartbeat_interval_s: float = 0.1
    # An instance whose heartbeats (or whose step loop) stop for this long is declared dead; its
    # requests are recomputed on the others.
    instance_timeout_s: float = 5.0
    # The rebalancer counts a block copied between hosts as this many copies within one host.
    cross_host_copy_factor: float = 4.0
    # A home gives up on a holder's attention partial after this long (the step's requests fail).
    attention_timeout_s: float = 60.0
    # Test hook, off by default: instance -> extra seconds slept in every step (a straggler).
    debug_step_delay_s: Optional[dict[int, float]] = None
    # A profiled PerfModel (JSON, see `infinite-llm profile`); None: a rough default model.
    perf_model_path: Optional[str] = None


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill size)
    # Largest prefill chunk one request may take per step (None: the whole budget). Lower it so
    # that several prompts prefill side by side instead of one long prompt taking every step.
    long_prefill_token_threshold: Optional[int] = None
    # A step carrying a running prompt's chunk may take this many times a decode-only step
    # (measured) while others decode or wait; chunks are sized to fit. A prompt alone takes the
    # whole budget, and a request arriving during its step waits at most `lone_prefill_slowdown`
    # - 1 decode-only steps: past that the step is called off and redone. Alone on an instance
    # other instances wait on (it lends KV, or the prompt spans), chunks fit that bound instead
    # (control/pacer.py).
    prefill_slowdown: float = 2.0
    lone_prefill_slowdown: float = 4.0
    # A request larger than one instance is admitted only while every instance holding part of
    # it keeps this share of its KV pool free for the requests that fit one instance (else they
    # would soon reclaim its blocks and its computed prompt would be lost).
    headroom_fraction: float = 0.25
    # A request larger than one instance waits for its holders at every layer: a step carrying
    # a chunk of its prompt makes the requests that fit one instance wait as long. Its chunks
    # therefore run in steps of their own while such requests have work, and share their step
    # at most once every this many steps (so that it is slowed, never starved).
    spanning_prefill_every: int = 16
    max_waiting: int = 1024  # bounded waiting queue (the server answers 429 past this)


@dataclass
class EngineConfig:
    model: str = "default"  # "default" (built-in) or a path to an HF checkpoint folder
    model_config: Optional[ModelConfig] = None  # filled in by the loader
    cache: CacheConfig = field(default_factory=CacheConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    served_model_name: Optional[str] = None
