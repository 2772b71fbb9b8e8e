"""The Llama-family model against HF transformers, with the reference ContiguousAttention backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infinite_llm.config import ModelConfig
from infinite_llm.model.llama import (
    ContiguousAttention,
    LlamaForCausalLM,
    RotaryEmbedding,
    causal_attention,
    compute_inv_freq,
)
from infinite_llm.model.loader import load_model
from tests.hf_fixtures import hf_greedy, load_hf_model, write_tiny_checkpoint

ATOL = 2e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llama": write_tiny_checkpoint(root / "llama", "llama", seed=1),
        "qwen2": write_tiny_checkpoint(root / "qwen2", "qwen2", seed=2),
        "llama3_scaled": write_tiny_checkpoint(root / "llama3", "llama3_scaled", seed=3),
        "mistral": write_tiny_checkpoint(root / "mistral", "mistral", seed=4),
        "tied": write_tiny_checkpoint(root / "tied", "llama", seed=5, tie_word_embeddings=True),
        # Llama's attention_bias puts a bias on o_proj as well as on q/k/v (Qwen2: q/k/v only).
        "llama_bias": write_tiny_checkpoint(root / "llama_bias", "llama", seed=6, attention_bias=True),
    }


def _prompt(seed: int, n: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


@torch.no_grad()
def _our_logits(model: LlamaForCausalLM, seqs: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """One step over several whole sequences concatenated; logits per sequence."""
    ids = torch.tensor([t for s in seqs.values() for t in s])
    pos = torch.tensor([p for s in seqs.values() for p in range(len(s))])
    hidden = model(ids, pos, ContiguousAttention([(name, len(s)) for name, s in seqs.items()]))
    logits = model.compute_logits(hidden)
    out, start = {}, 0
    for name, s in seqs.items():
        out[name] = logits[start : start + len(s)]
        start += len(s)
    return out


@torch.no_grad()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3_scaled", "mistral", "tied", "llama_bias"])
def test_forward_matches_hf_float32(checkpoints, arch):
    path = checkpoints[arch]
    _, ours = load_model(str(path))
    hf = load_hf_model(path)
    ids = _prompt(0, 37)
    got = _our_logits(ours, {"s": ids})["s"]
    want = _hf_logits(hf, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape == (37, 512)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_mixed_length_sequences_in_one_step_match_hf(checkpoints):
    path = checkpoints["qwen2"]
    _, ours = load_model(str(path))
    hf = load_hf_model(path)
    seqs = {"a": _prompt(1, 23), "b": _prompt(2, 1), "c": _prompt(3, 64), "d": _prompt(4, 5)}
    got = _our_logits(ours, seqs)
    for name, ids in seqs.items():
        torch.testing.assert_close(got[name], _hf_logits(hf, ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decode_equals_full_forward(checkpoints):
    """Prefill in chunks of mixed size, then token by token, two sequences interleaved."""
    _, model = load_model(str(checkpoints["llama3_scaled"]))
    full = {"x": _prompt(5, 40), "y": _prompt(6, 29)}
    want = _our_logits(model, full)
    # Step schedule: per step, how many new tokens each sequence contributes.
    schedule = [{"x": 16, "y": 7}, {"x": 10, "y": 0}, {"x": 1, "y": 10}] + [{"x": 1, "y": 1}] * 13
    done = {"x": 0, "y": 0}
    store = None
    got: dict[str, list[torch.Tensor]] = {"x": [], "y": []}
    for step in schedule:
        step = {k: min(n, len(full[k]) - done[k]) for k, n in step.items()}
        names = [k for k, n in step.items() if n > 0]
        ids = torch.tensor([t for k in names for t in full[k][done[k] : done[k] + step[k]]])
        pos = torch.tensor([p for k in names for p in range(done[k], done[k] + step[k])])
        attention = ContiguousAttention([(k, step[k]) for k in names], store)
        logits = model.compute_logits(model(ids, pos, attention))
        store = attention.store
        start = 0
        for k in names:
            got[k].append(logits[start : start + step[k]])
            start += step[k]
            done[k] += step[k]
    assert done == {"x": 40, "y": 29}
    for k in full:
        torch.testing.assert_close(torch.cat(got[k]), want[k], atol=ATOL, rtol=0)


@torch.no_grad()
def _our_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    attention = ContiguousAttention([("s", len(prompt))])
    ids, start, out = prompt, 0, []
    for _ in range(n):
        hidden = model(torch.tensor(ids), torch.arange(start, start + len(ids)), attention)
        token = int(model.compute_logits(hidden[-1:]).argmax())
        out.append(token)
        start += len(ids)
        ids = [token]
        attention = ContiguousAttention([("s", 1)], attention.store)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama_bias"])
def test_greedy_loop_equals_hf_generate(checkpoints, arch):
    path = checkpoints[arch]
    _, model = load_model(str(path))
    prompt = [1] + _prompt(7, 11)
    ours = _our_greedy(model, prompt, 24)
    assert ours == hf_greedy(path, prompt, 24)
    assert len(set(ours)) > 4, "tiny checkpoints should not decode a degenerate repetition"


def test_bfloat16_is_close_to_float32(checkpoints):
    path = checkpoints["llama"]
    _, m32 = load_model(str(path), dtype="float32")
    _, m16 = load_model(str(path), dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16
    ids = _prompt(8, 20)
    l32 = _our_logits(m32, {"s": ids})["s"]
    l16 = _our_logits(m16, {"s": ids})["s"]
    assert l16.dtype == torch.float32
    max_err = (l16 - l32).abs().max() / l32.std()
    mean_err = (l16 - l32).abs().mean() / l32.std()
    # bf16 keeps ~3 significant digits: errors are a few percent of the logits' spread (measured
    # here: max ~0.1, mean ~0.01); a mis-cast layer would give errors of the order of the spread.
    assert max_err < 0.2 and mean_err < 0.05, (max_err, mean_err)
    assert (l16.argmax(-1) == l32.argmax(-1)).float().mean() > 0.8


def test_empty_step_still_runs_every_layer(checkpoints):
    """An instance that only hosts guests' queries calls the model with zero own tokens."""
    _, model = load_model(str(checkpoints["llama"]))
    calls = []

    class Recorder:
        def attend(self, layer_idx, q, k, v):
            calls.append((layer_idx, tuple(q.shape), tuple(k.shape)))
            return torch.zeros_like(q)

    hidden = model(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), Recorder())
    assert hidden.shape == (0, 64)
    assert calls == [(0, (0, 4, 16), (0, 2, 16)), (1, (0, 4, 16), (0, 2, 16))]


def test_rotary_cache_grows_on_demand_not_to_max_positions():
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1 << 30)
    rope = RotaryEmbedding(cfg)
    assert rope.cached_positions == 0
    cos_small, _ = rope(torch.tensor([0, 5, 3]), torch.float32)
    assert 6 <= rope.cached_positions <= 1024
    cos, sin = rope(torch.tensor([100_000]), torch.float32)
    assert 100_001 <= rope.cached_positions <= 2 * 100_001
    # Values are position * inv_freq, independent of how large the table has grown.
    freqs = 100_000.0 * compute_inv_freq(cfg)
    torch.testing.assert_close(cos[0], torch.cat((freqs, freqs)).cos())
    torch.testing.assert_close(rope(torch.tensor([0, 5, 3]), torch.float32)[0], cos_small)


def test_llama3_and_linear_rope_scaling_match_hf_formulas():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = {
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192},
        "linear": {"factor": 4.0},
    }
    for rope_type, params in cases.items():
        ours = compute_inv_freq(ModelConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                                            rope_theta=500000.0, rope_scaling={"rope_type": rope_type, **params}))
        hf_cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                             rope_parameters={"rope_type": rope_type, "rope_theta": 500000.0, **params})
        want, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
        torch.testing.assert_close(ours, want, atol=0, rtol=0)


def test_unknown_rope_scaling_type_is_rejected():
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        compute_inv_freq(ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="needs 'low_freq_factor'"):
        compute_inv_freq(ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_load_hf_state_dict_rejects_missing_unexpected_and_misshaped(checkpoints):
    from safetensors.torch import load_file

    path = checkpoints["llama"]
    cfg, model = load_model(str(path))
    tensors = load_file(str(path / "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        model.load_hf_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\): model.layers.9.foo"):
        model.load_hf_state_dict({**tensors, "model.layers.9.foo": torch.zeros(1)})
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"k_proj.weight.*shape \(64, 64\).*expects \(32, 64\)"):
        model.load_hf_state_dict(bad)
    # Extra tensors some checkpoints carry are accepted.
    model.load_hf_state_dict({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})


def test_tied_model_ignores_stored_lm_head_and_uses_embeddings(checkpoints):
    path = checkpoints["tied"]
    cfg, model = load_model(str(path))
    assert cfg.tie_word_embeddings and model.lm_head is None
    h = torch.randn(3, 64)
    torch.testing.assert_close(model.compute_logits(h), h @ model.embed_tokens.weight.T)


def test_causal_attention_masks_future_and_groups_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    out = causal_attention(q, k, v)
    # The last query (position 4) sees all 5 keys; the first (position 2) only keys 0..2.
    for qi, visible in ((0, 3), (2, 5)):
        for h in range(4):
            kv_h = h // 2
            w = torch.softmax(q[qi, h] @ k[:visible, kv_h].T / 8**0.5, dim=-1)
            torch.testing.assert_close(out[qi, h], w @ v[:visible, kv_h])


def test_contiguous_attention_rejects_token_count_mismatch():
    attention = ContiguousAttention([("a", 2), ("b", 3)])
    with pytest.raises(ValueError, match="4 tokens but the sequences given sum to 5"):
        attention.attend(0, torch.zeros(4, 2, 8), torch.zeros(4, 1, 8), torch.zeros(4, 1, 8))
    with pytest.raises(ValueError, match="appears twice"):
        ContiguousAttention([("a", 1), ("a", 1)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", None)])
def test_cuda_matches_cpu(checkpoints, dtype, atol):
    path = checkpoints["qwen2"]
    _, cpu = load_model(str(path))
    _, gpu = load_model(str(path), device="cuda", dtype=dtype)
    assert next(gpu.parameters()).device.type == "cuda"
    seqs = {"a": _prompt(9, 33), "b": _prompt(10, 7)}
    want = _our_logits(cpu, seqs)
    ids = torch.tensor([t for s in seqs.values() for t in s], device="cuda")
    pos = torch.tensor([p for s in seqs.values() for p in range(len(s))], device="cuda")
    with torch.no_grad():
        hidden = gpu(ids, pos, ContiguousAttention([(k, len(s)) for k, s in seqs.items()]))
        got = gpu.compute_logits(hidden).cpu()
    expected = torch.cat(list(want.values()))
    if atol is not None:
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    else:
        assert (got - expected).abs().mean() / expected.std() < 0.05
