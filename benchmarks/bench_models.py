"""A random-weight HF Llama checkpoint large enough for bandwidth-floor measurements.

The default model's 12.7 MB of weights fit in a CPU's last-level cache, so a decode step on it
reads from cache, not memory, and a "step / memory-bandwidth floor" ratio on it means nothing.
This one has about 200 MB of non-embedding float32 weights (copy bandwidth on the 2-core CI
machine stops dropping at about 128 MB). It is written locally from a seeded generator, once per
cache folder (no download), by the same code as the default model, so transformers loads it too.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.config import ModelConfig  # noqa: E402
from infinite_llm.model.default_model import default_cache_root, default_model_config, write_default_model  # noqa: E402

BENCH_MODEL_DIRNAME = "bench-llama-200mb-v1"
BENCH_MODEL_SEED = 15


def bench_model_config() -> ModelConfig:
    """8 layers of hidden 768 / MLP 2048, 12 query heads over 4 KV heads (GQA), head dim 64."""
    cfg = default_model_config()
    cfg.hidden_size = 768
    cfg.intermediate_size = 2048
    cfg.num_hidden_layers = 8
    cfg.num_attention_heads = 12
    cfg.num_key_value_heads = 4
    cfg.head_dim = 64
    cfg.max_position_embeddings = 32768
    return cfg


def ensure_bench_model() -> Path:
    """The checkpoint folder, written on first use (under a temporary name, then renamed)."""
    target = default_cache_root() / BENCH_MODEL_DIRNAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BENCH_MODEL_DIRNAME}-", dir=target.parent))
    try:
        write_default_model(staging, bench_model_config(), BENCH_MODEL_SEED)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_bench_model())
