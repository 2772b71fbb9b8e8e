"""Tests for the step-time model: NNLS, fitting, roofline presets, persistence."""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.config import ModelConfig
from infinite_llm.control.perf_model import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    HardwareSpec,
    ModelSpec,
    PerfModel,
    ProfileSample,
    kv_token_capacity,
    nnls,
)

TRUE = PerfModel(t_fixed=8e-3, t_per_token=2e-5, t_per_seq=1e-4, t_per_kv_token=3e-8)


def synthetic_samples(model: PerfModel, n: int, noise: float, seed: int) -> list[ProfileSample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        batch = rng.randint(1, 64)
        # Half decode steps (one token per sequence), half prefill-like steps.
        tokens = batch if rng.random() < 0.5 else batch + rng.randint(0, 2048)
        kv = rng.randint(0, 400_000)
        t = model.step_time(batch, tokens, kv) * (1 + rng.gauss(0, noise))
        samples.append(ProfileSample(batch, tokens, kv, t))
    return samples


# ------------------------------------------------------------------------------------ NNLS
def test_nnls_equals_least_squares_when_solution_is_positive():
    rng = np.random.default_rng(0)
    a = rng.random((30, 4))
    x_true = np.array([1.0, 2.0, 0.5, 3.0])
    x = nnls(a, a @ x_true)
    np.testing.assert_allclose(x, x_true, rtol=1e-9)


def test_nnls_clips_a_negative_coefficient_to_zero():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])
    x = nnls(a, b)
    # Unconstrained least squares gives x2 < 0; constrained, x2 = 0 and x1 minimises the rest.
    assert x[1] == 0.0
    assert x[0] == pytest.approx(1.5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 12), n=st.integers(1, 5))
def test_nnls_satisfies_kkt_conditions(seed, m, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, n))
    b = rng.normal(size=m)
    x = nnls(a, b)
    gradient = a.T @ (b - a @ x)  # minus the gradient of 0.5 * ||ax - b||^2
    assert np.all(x >= 0)
    scale = 1e-8 * (1 + np.abs(a).sum() * (1 + np.abs(b).sum()))
    assert np.all(gradient <= scale)  # no variable could decrease the residual by growing
    assert np.all(np.abs(gradient[x > 0]) <= scale)  # free variables are at a stationary point


def test_nnls_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        nnls(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        nnls(np.array([[np.nan]]), np.ones(1))


# ------------------------------------------------------------------------------------ fitting
def test_fit_recovers_known_coefficients_from_noisy_samples():
    fitted = PerfModel.fit(synthetic_samples(TRUE, 400, noise=0.02, seed=1))
    for name in ("t_fixed", "t_per_token", "t_per_seq", "t_per_kv_token"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.1), name
    assert 0.01 < fitted.fit_relative_rmse < 0.03  # the injected 2% noise
    assert fitted.metadata["num_samples"] == 400


def test_fit_is_exact_without_noise():
    fitted = PerfModel.fit(synthetic_samples(TRUE, 50, noise=0.0, seed=2))
    assert fitted.fit_relative_rmse < 1e-9
    assert fitted.t_per_kv_token == pytest.approx(TRUE.t_per_kv_token, rel=1e-6)


def test_fit_keeps_coefficients_non_negative():
    # Step time that falls with batch size: an unconstrained fit would give t_per_seq < 0.
    samples = [ProfileSample(b, b, kv, 0.05 - 0.0004 * b + 1e-8 * kv)
               for b in range(1, 60, 4) for kv in (0, 10_000, 100_000)]
    fitted = PerfModel.fit(samples)
    for name in ("t_fixed", "t_per_token", "t_per_seq", "t_per_kv_token"):
        assert getattr(fitted, name) >= 0
    assert fitted.t_per_seq == 0.0 and fitted.t_per_token == 0.0
    assert fitted.t_per_kv_token > 0


def test_fit_rejects_too_few_or_invalid_samples():
    with pytest.raises(ValueError, match="at least 4"):
        PerfModel.fit(synthetic_samples(TRUE, 3, 0.0, 0))
    with pytest.raises(ValueError, match="step_time_s"):
        ProfileSample(1, 1, 0, 0.0)
    with pytest.raises(ValueError, match="num_tokens"):
        ProfileSample(4, 2, 0, 0.1)
    with pytest.raises(ValueError, match="kv_tokens"):
        ProfileSample(1, 1, -5, 0.1)


# ------------------------------------------------------------------------------------ predictions
def test_decode_time_grows_with_kv_tokens_and_is_flat_in_small_batch():
    perf = PerfModel.from_hardware(HARDWARE_PRESETS["A100-80GB"], MODEL_PRESETS["llama2-7b"])
    times = [perf.decode_step_time(8, kv) for kv in (0, 10_000, 100_000, 1_000_000)]
    assert times == sorted(times) and times[0] < times[-1]
    # Reading weights dominates a small decode batch: 32x the tokens for well under 2x the time.
    assert perf.decode_step_time(32, 0) < 1.25 * perf.decode_step_time(1, 0)


def test_step_time_is_the_sum_of_its_parts():
    assert TRUE.step_time(4, 100, 5000) == pytest.approx(
        TRUE.non_attention_time(4, 100) + TRUE.attention_time(5000))
    assert TRUE.decode_step_time(4, 5000) == TRUE.step_time(4, 4, 5000)
    # An instance serving only guest attention runs no forward pass.
    assert TRUE.step_time(0, 0, 5000) == TRUE.attention_time(5000)
    assert TRUE.step_time(0, 0, 0) == 0.0


def test_invalid_coefficients_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="t_per_seq"):
        PerfModel(t_fixed=1.0, t_per_token=0.0, t_per_seq=-1.0, t_per_kv_token=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        TRUE.decode_step_time(-1, 0)
    with pytest.raises(ValueError, match="kv_tokens"):
        TRUE.attention_time(1.5)


# ------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "name,intermediate,layers,hidden,heads,kv_heads",
    [("llama2-7b", 11008, 32, 4096, 32, 32), ("llama2-13b", 13824, 40, 5120, 40, 40),
     ("llama2-70b", 28672, 80, 8192, 64, 8)],
)
def test_model_presets_match_llama2_shapes(name, intermediate, layers, hidden, heads, kv_heads):
    spec = MODEL_PRESETS[name]
    config = ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)
    assert spec.num_params == config.num_parameters()
    assert spec.kv_bytes_per_token(2) == config.kv_bytes_per_token(2)


def test_kv_bytes_per_token_known_values():
    assert MODEL_PRESETS["llama2-7b"].kv_bytes_per_token() == 512 * 1024  # 0.5 MiB per token
    assert MODEL_PRESETS["llama2-70b"].kv_bytes_per_token() == 320 * 1024  # GQA: 8 KV heads


def test_hardware_presets_are_sane():
    a100, h100 = HARDWARE_PRESETS["A100-80GB"], HARDWARE_PRESETS["H100-80GB"]
    for hw in (a100, h100):
        assert 78e9 < hw.hbm_bytes < 90e9
        assert hw.intra_node_bandwidth_Bps > hw.inter_node_bandwidth_Bps
        assert hw.gpus_per_node == 8
    assert h100.hbm_bandwidth_Bps > a100.hbm_bandwidth_Bps
    assert h100.peak_flops > 3 * a100.peak_flops
    assert a100.inter_node_bandwidth_Bps == 25e9


def test_70b_does_not_fit_one_a100_but_fits_four():
    a100, llama70 = HARDWARE_PRESETS["A100-80GB"], MODEL_PRESETS["llama2-70b"]
    assert llama70.weight_bytes(2) > a100.hbm_bytes
    with pytest.raises(ValueError, match="do not fit"):
        kv_token_capacity(a100, llama70)
    # 4 x 80 GiB * 0.9 = 309 GB, minus 138 GB of weights, leaves ~520K tokens of 320 KiB.
    assert 500_000 < kv_token_capacity(a100, llama70, tensor_parallel=4) < 550_000
    # 7B on one A100: 77 GB usable - 13.5 GB of weights = ~64 GB of KV at 0.5 MiB per token.
    assert 115_000 < kv_token_capacity(a100, MODEL_PRESETS["llama2-7b"]) < 125_000


def test_roofline_numbers():
    a100, llama7 = HARDWARE_PRESETS["A100-80GB"], MODEL_PRESETS["llama2-7b"]
    perf = PerfModel.from_hardware(a100, llama7)
    assert perf.t_fixed == pytest.approx(2 * 6.738e9 / 2.039e12, rel=1e-3)  # ~6.6 ms
    assert perf.t_per_kv_token == pytest.approx(512 * 1024 / 2.039e12)
    assert perf.t_per_token == pytest.approx(2 * 6.738e9 / 312e12, rel=1e-3)
    tp4 = PerfModel.from_hardware(a100, llama7, tensor_parallel=4)
    assert tp4.t_fixed == pytest.approx(perf.t_fixed / 4)
    assert perf.metadata["source"] == "roofline"
    assert PerfModel.from_hardware(HARDWARE_PRESETS["H100-80GB"], llama7).t_fixed < perf.t_fixed


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelSpec("bad", num_params=1, num_layers=1, hidden_size=8, num_kv_heads=3, head_dim=2, num_heads=4)
    with pytest.raises(ValueError, match="hbm_bandwidth_Bps"):
        HardwareSpec("bad", 1, 0.0, 1.0, 1.0, 1.0, 1)


# ------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    fitted = PerfModel.fit(synthetic_samples(TRUE, 40, noise=0.01, seed=3), source="unit-test")
    path = tmp_path / "perf.json"
    fitted.save(path)
    loaded = PerfModel.load(path)
    assert loaded == fitted
    assert loaded.metadata["source"] == "unit-test"
    roofline = PerfModel.from_hardware(HARDWARE_PRESETS["H100-80GB"], MODEL_PRESETS["llama2-70b"],
                                       tensor_parallel=8)
    roofline.save(path)
    assert PerfModel.load(path) == roofline


def test_load_rejects_foreign_or_incomplete_files(tmp_path):
    path = tmp_path / "perf.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PerfModel.load(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a perf model"):
        PerfModel.load(path)
    data = TRUE.to_dict()
    del data["coefficients"]["t_per_seq"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="t_per_seq"):
        PerfModel.load(path)
