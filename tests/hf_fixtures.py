"""Tiny HF checkpoints written by transformers itself, and an HF greedy-decoding oracle.

Other test modules use these to compare our model, loader, runtime and engine against
transformers on real checkpoint folders, fully offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from infinite_llm.tokenizer import DEFAULT_VOCAB_SIZE, write_default_tokenizer

TINY_ARCHS = ("llama", "qwen2", "llama3_scaled", "mistral")

# Small enough that a forward pass takes milliseconds; GQA (4 query heads over 2 KV heads).
_TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=DEFAULT_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
# Weight scale: large enough that logits are spread out (greedy output varies and argmax margins
# dwarf float rounding), small enough that activations stay tame.
_WEIGHT_STD = 0.15


def _hf_config(arch: str, tie_word_embeddings: bool, overrides: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kwargs: dict[str, Any] = dict(_TINY_SHAPE, tie_word_embeddings=tie_word_embeddings)
    if arch == "llama":
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        cls = LlamaConfig
    elif arch == "llama3_scaled":
        # original_max_position_embeddings is small so that the scaling changes most frequencies.
        kwargs["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
        cls = LlamaConfig
    elif arch == "qwen2":
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        kwargs["use_sliding_window"] = False
        cls = Qwen2Config
    elif arch == "mistral":
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        kwargs["sliding_window"] = None
        kwargs["head_dim"] = 32  # head_dim * heads != hidden_size, which Mistral allows
        cls = MistralConfig
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    kwargs.update(overrides)
    return cls(**kwargs)


@torch.no_grad()
def write_tiny_checkpoint(dir: Path, arch: str = "llama", seed: int = 0, tie_word_embeddings: bool = False,
                          **overrides: Any) -> Path:
    """Write a tiny HF checkpoint (config, safetensors, generation config, our tokenizer) into `dir`.

    `overrides` go into the HF config (e.g. num_hidden_layers=3). Pass max_shard_size="20KB"
    to get a sharded checkpoint with model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM

    max_shard_size = overrides.pop("max_shard_size", None)
    config = _hf_config(arch, tie_word_embeddings, overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Re-initialise every parameter from our own seeded generator: HF's init leaves biases at 0
    # and norm weights at 1, which would hide a mis-wired bias or norm.
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(_WEIGHT_STD * torch.randn(param.shape, generator=gen))
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dir, **save_kwargs)
    write_default_tokenizer(dir)
    return dir


def load_hf_model(dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def hf_greedy(dir: Path, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """Greedy continuation of `prompt_ids` by transformers' generate() in float32 (new tokens only)."""
    from transformers import GenerationConfig

    model = load_hf_model(dir)
    eos = model.config.eos_token_id if stop_at_eos else None
    if not stop_at_eos:
        # generate() fills unset (None) options from the checkpoint's generation_config, so the
        # EOS must be removed there too for an EOS-free oracle.
        model.generation_config.eos_token_id = None
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=None,
    )
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_config)
    return out[0, len(prompt_ids):].tolist()
