"""The built-in default model: a small, deterministic, random-weight Llama checkpoint.

It lets the server, CLI, tests and benchmarks run with no download. It is a real HF checkpoint
folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that transformers can load too, written once per cache folder.
The weights come from a seeded torch.Generator, so every machine builds identical bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from infinite_llm.config import ModelConfig
from infinite_llm.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_default_tokenizer, write_default_tokenizer

# Bump when anything below (shapes, seed, scales, tokenizer) changes: old caches stay valid for
# whoever wrote them, and a new build goes to a new folder.
DEFAULT_MODEL_VERSION = "v2"  # v2: merges learned by tokenizers' BpeTrainer
DEFAULT_MODEL_DIRNAME = f"default-model-{DEFAULT_MODEL_VERSION}"
DEFAULT_MODEL_SEED = 20240105
CACHE_ENV = "INFINITE_LLM_CACHE"
REQUIRED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
)

# Weight scales. Projections use std = gain / sqrt(fan_in). The residual stream stays O(1) and
# the logits get a spread of a few units, so greedy decoding follows the context instead of
# collapsing onto one token (checked by tests/test_loader.py).
_EMBED_STD = 1.0
_PROJ_GAIN = 1.0
_LM_HEAD_GAIN = 4.0
_NORM_JITTER = 0.1


def default_model_config() -> ModelConfig:
    tok = build_default_tokenizer()
    return ModelConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1 << 20,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS_TOKEN),
        eos_token_id=tok.token_to_id(EOS_TOKEN),
    )


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infinite_llm"


def _hf_config_json(cfg: ModelConfig, pad_token_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both rope conventions, so transformers 4 and 5 read the same model.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def default_model_weights(cfg: ModelConfig, seed: int = DEFAULT_MODEL_SEED) -> dict[str, torch.Tensor]:
    """HF-named float32 weights drawn from a seeded generator, in a fixed order."""
    assert cfg.head_dim is not None
    gen = torch.Generator().manual_seed(seed)
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * std

    def proj(out_features: int, in_features: int, gain: float = _PROJ_GAIN) -> torch.Tensor:
        return normal(out_features, in_features, gain / in_features**0.5)

    def norm() -> torch.Tensor:
        return 1.0 + _NORM_JITTER * torch.randn(h, generator=gen)

    weights = {"model.embed_tokens.weight": normal(cfg.vocab_size, h, _EMBED_STD)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = proj(cfg.num_attention_heads * d, h)
        weights[p + "self_attn.k_proj.weight"] = proj(cfg.num_key_value_heads * d, h)
        weights[p + "self_attn.v_proj.weight"] = proj(cfg.num_key_value_heads * d, h)
        weights[p + "self_attn.o_proj.weight"] = proj(h, cfg.num_attention_heads * d)
        weights[p + "post_attention_layernorm.weight"] = norm()
        weights[p + "mlp.gate_proj.weight"] = proj(inter, h)
        weights[p + "mlp.up_proj.weight"] = proj(inter, h)
        weights[p + "mlp.down_proj.weight"] = proj(h, inter)
    weights["model.norm.weight"] = norm()
    weights["lm_head.weight"] = proj(cfg.vocab_size, h, _LM_HEAD_GAIN)
    return {name: t.contiguous() for name, t in weights.items()}


def write_default_model(folder: Path, cfg: ModelConfig | None = None, seed: int = DEFAULT_MODEL_SEED) -> None:
    """Write the complete default checkpoint into `folder` (which must exist and be empty).

    `cfg` / `seed` give a random-weight checkpoint of another shape (the benchmarks need one
    whose weights do not fit in the CPU's cache); the default model uses neither."""
    from safetensors.torch import save_file

    cfg = cfg if cfg is not None else default_model_config()
    tok = build_default_tokenizer()
    pad_id = tok.token_to_id(PAD_TOKEN)

    def write_json(name: str, obj: dict) -> None:
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    write_json("config.json", _hf_config_json(cfg, pad_id))
    write_json("generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": pad_id,
    })
    save_file(default_model_weights(cfg, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_default_tokenizer(folder)


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The default checkpoint folder `<cache>/default-model-<version>`, built on first use.

    The cache root is `cache_dir`, else $INFINITE_LLM_CACHE, else ~/.cache/infinite_llm. The
    folder is written under a temporary name and renamed into place, so concurrent callers
    (several processes or Ray actors) never see a half-written checkpoint.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / DEFAULT_MODEL_DIRNAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}-", dir=root))
    try:
        write_default_model(staging)
        if target.exists() and not _is_complete(target):
            # A folder left by something other than this function (renames are atomic): replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target):  # not a concurrent winner: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
