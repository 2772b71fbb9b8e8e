"""Checkpoint loading (config.json conventions, safetensors, errors) and the built-in default model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from infinite_llm.model.default_model import DEFAULT_MODEL_DIRNAME, REQUIRED_FILES, ensure_default_model
from infinite_llm.model.llama import ContiguousAttention
from infinite_llm.model.loader import load_model, load_model_config, load_weights, resolve_model_path
from infinite_llm.tokenizer import load_tokenizer
from tests.hf_fixtures import load_hf_model, write_tiny_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=11)


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


# --------------------------------------------------------------------------- config.json


def test_config_fields_from_transformers5_checkpoint(tmp_path):
    qwen = load_model_config(write_tiny_checkpoint(tmp_path / "q", "qwen2", seed=1))
    assert (qwen.architecture, qwen.model_type, qwen.attention_bias) == ("Qwen2ForCausalLM", "qwen2", True)
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads) == (
        64, 2, 4, 2)
    assert qwen.rope_theta == 1000000.0 and qwen.rope_scaling is None
    scaled = load_model_config(write_tiny_checkpoint(tmp_path / "l3", "llama3_scaled", seed=1))
    assert scaled.rope_theta == 500000.0
    assert scaled.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    mistral = load_model_config(write_tiny_checkpoint(tmp_path / "m", "mistral", seed=1))
    assert mistral.head_dim == 32 and mistral.model_type == "mistral"


def test_attention_biases_follow_each_architecture(tmp_path, llama_dir):
    """Llama's attention_bias covers q/k/v and o_proj; Qwen2 always has q/k/v biases and never an
    o_proj one; Mistral has none."""
    biased = load_model_config(write_tiny_checkpoint(tmp_path / "lb", "llama", seed=1, attention_bias=True))
    assert (biased.attention_bias, biased.o_proj_bias) == (True, True)
    plain = load_model_config(llama_dir)
    assert (plain.attention_bias, plain.o_proj_bias) == (False, False)
    qwen = load_model_config(write_tiny_checkpoint(tmp_path / "q", "qwen2", seed=1))
    assert (qwen.attention_bias, qwen.o_proj_bias) == (True, False)
    mistral = write_tiny_checkpoint(tmp_path / "m", "mistral", seed=1)
    _edit_config(mistral, attention_bias=True)  # MistralAttention ignores it
    mistral_config = load_model_config(mistral)
    assert (mistral_config.attention_bias, mistral_config.o_proj_bias) == (False, False)


def test_legacy_transformers4_rope_keys(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "legacy")
    _edit_config(folder, rope_parameters=None, rope_theta=250000.0,
                 rope_scaling={"type": "linear", "factor": 2.0})
    cfg = load_model_config(folder)
    assert cfg.rope_theta == 250000.0
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "unsupported rope scaling 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
         "needs 'low_freq_factor'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_size": None}, "lacks the required field 'hidden_size'"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, llama_dir, changes, message):
    folder = _copy(llama_dir, tmp_path / "bad")
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_model_config(folder)


def test_missing_folder_config_and_weights(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    no_config = _copy(llama_dir, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model_config(no_config)
    no_weights = _copy(llama_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_model_config(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors weights are supported"):
        load_model(str(no_weights))


def test_shape_mismatch_between_config_and_weights(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "wide")
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(128, 64\).*expects \(96, 64\)"):
        load_model(str(folder))
    fewer = _copy(llama_dir, tmp_path / "deep")
    _edit_config(fewer, num_hidden_layers=3)
    with pytest.raises(ValueError, match="missing 9 tensor"):
        load_model(str(fewer))


# --------------------------------------------------------------------------- weights


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = write_tiny_checkpoint(tmp_path / "single", "qwen2", seed=21)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", "qwen2", seed=21, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    _, a = load_model(str(single))
    _, b = load_model(str(sharded))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_missing_shard_is_reported(tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", "llama", seed=2, max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {victim.name}"):
        load_model_config(sharded)


def test_load_weights_overwrites_every_parameter(llama_dir):
    cfg, model = load_model(str(llama_dir))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    load_weights(model, llama_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


# --------------------------------------------------------------------------- default model


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_default_model_is_deterministic(tmp_path, default_dir):
    again = ensure_default_model(tmp_path / "other-cache")
    assert again == tmp_path / "other-cache" / DEFAULT_MODEL_DIRNAME
    assert set(_digests(again)) == set(REQUIRED_FILES)
    assert _digests(again) == _digests(default_dir)


def test_default_model_is_reused_and_incomplete_folders_are_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITE_LLM_CACHE", str(tmp_path))
    folder = resolve_model_path("default")
    assert folder == tmp_path / DEFAULT_MODEL_DIRNAME
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    (folder / "tokenizer.json").unlink()
    assert ensure_default_model() == folder
    assert set(_digests(folder)) == set(REQUIRED_FILES)
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_DIRNAME]  # no staging leftovers


@torch.no_grad()
def test_default_model_loads_in_transformers_and_matches(default_dir):
    from transformers import AutoTokenizer

    cfg, ours = load_model(str(default_dir))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (512, 256, 4, 8, 4, 688)
    assert cfg.max_position_embeddings >= 1 << 20 and not cfg.tie_word_embeddings
    hf = load_hf_model(default_dir)
    hf_tok = AutoTokenizer.from_pretrained(default_dir)
    tok = load_tokenizer(default_dir)
    ids = tok.encode("The capital of France is")
    assert ids == hf_tok("The capital of France is").input_ids
    got = ours.compute_logits(ours(torch.tensor(ids), torch.arange(len(ids)), ContiguousAttention([(0, len(ids))])))
    torch.testing.assert_close(got, hf(torch.tensor([ids])).logits[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_default_model_greedy_output_is_not_degenerate(default_dir):
    _, model = load_model(str(default_dir))
    tok = load_tokenizer(default_dir)
    for prompt in ("Hello, my name is", "1 2 3 4"):
        ids = tok.encode(prompt)
        attention = ContiguousAttention([(0, len(ids))])
        start, out = 0, []
        for _ in range(32):
            hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), attention)
            start += len(ids)
            ids = [int(model.compute_logits(hidden[-1:]).argmax())]
            out.append(ids[0])
            attention = ContiguousAttention([(0, 1)], attention.store)
        assert len(set(out)) >= 16, out
