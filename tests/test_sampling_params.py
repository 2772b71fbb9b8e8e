"""Sampling parameter validation (OpenAI's ranges, the offending field named) and a sampler that
no logits or parameters can make raise: one request's bad numbers must never kill the engine."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.instance.sampler import sample_tokens
from infinite_llm.sampling import GREEDY_TEMPERATURE, SamplingParamError, SamplingParams

INF, NAN = float("inf"), float("nan")


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": NAN}, "temperature"),
        ({"temperature": INF}, "temperature"),
        ({"temperature": -INF}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.0001}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": NAN}, "top_p"),
        ({"top_p": INF}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": False}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_naming_the_parameter(kwargs, param):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert info.value.param == param
    assert param in str(info.value)


def test_validate_catches_fields_changed_after_construction():
    params = SamplingParams()
    params.temperature = NAN
    with pytest.raises(SamplingParamError) as info:
        params.validate()
    assert info.value.param == "temperature"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0}, {"temperature": 1e-40}, {"temperature": 2}, {"temperature": 0.7},
        {"top_p": 1e-30}, {"top_p": 1}, {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"top_k": 10**9},
        {"max_tokens": None}, {"max_tokens": 1}, {"seed": -5}, {"seed": 2**80},
        {"stop": "x"}, {"stop_token_ids": [0, 7]},
    ],
)
def test_valid_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs).validate()


def test_temperatures_below_the_threshold_are_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-40).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert not SamplingParams(temperature=1.0).greedy


# ------------------------------------------------------------------------------ the sampler
def _sample(logits: list[list[float]], params: SamplingParams, seed: int = 0) -> tuple[list[int], list[float]]:
    rows = torch.tensor(logits, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    return sample_tokens(rows, [params] * len(logits), [0] * len(logits), generator)


def _unchecked(**fields) -> SamplingParams:
    """Params with values validate() would refuse: a sampler must survive a caller that skipped it."""
    params = SamplingParams()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def test_tiny_temperature_does_not_overflow():
    # logits / 1e-40 is inf in float32: the old sampler passed NaN probabilities to multinomial.
    logits = [[0.5, 3.0, -2.0, 2.9]]
    assert _sample(logits, SamplingParams(temperature=1e-40))[0] == [1]
    # The smallest temperature that still samples, on logits spanning the float32 range.
    tokens, logprobs = _sample([[-3e38, 3e38, 0.0, 1e38]], SamplingParams(temperature=GREEDY_TEMPERATURE))
    assert tokens == [1] and math.isfinite(logprobs[0])


@pytest.mark.parametrize(
    "row, allowed",
    [
        ([1.0, 2.0, INF, -INF, NAN, 0.0], {2}),  # +inf wins, NaN never does
        ([INF, INF, 0.0, 0.0], {0, 1}),  # two "certain" tokens share the mass
        ([NAN, 1.0, NAN, 2.0], {1, 3}),
        ([-INF, -INF, 5.0, -INF], {2}),
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1e-5, 0.7, 2.0])
def test_non_finite_logits_are_sanitized(row, allowed, temperature):
    for seed in range(5):
        tokens, logprobs = _sample([row], SamplingParams(temperature=temperature), seed)
        assert tokens[0] in allowed
        assert not math.isnan(logprobs[0])


@pytest.mark.parametrize("row", [[NAN] * 4, [-INF] * 4, [NAN, -INF, NAN, -INF]])
def test_a_row_without_any_finite_logit_falls_back_to_argmax(row):
    tokens, logprobs = _sample([row, [0.0, 0.0, 9.0, 0.0]], SamplingParams(temperature=1.0))
    assert 0 <= tokens[0] < 4 and tokens[1] == 2  # the healthy row is unaffected
    assert not any(math.isnan(lp) for lp in logprobs)


def test_tiny_top_p_and_top_k_1_keep_only_the_best_token():
    logits = [[0.1, 0.3, 0.2, 0.25], [5.0, 4.99, -1.0, 0.0]]
    for seed in range(20):
        assert _sample(logits, SamplingParams(temperature=2.0, top_p=1e-30), seed)[0] == [1, 0]
        assert _sample(logits, SamplingParams(temperature=2.0, top_k=1), seed)[0] == [1, 0]


@pytest.mark.parametrize(
    "fields",
    [{"temperature": NAN}, {"temperature": INF}, {"temperature": -1.0}, {"temperature": 1e-300},
     {"top_p": 0.0}, {"top_p": NAN}, {"top_p": -1.0}, {"top_k": -7}],
)
def test_unvalidated_parameters_cannot_make_the_sampler_raise(fields):
    tokens, logprobs = _sample([[0.0, 1.0, 2.0], [NAN, INF, -INF]], _unchecked(**fields))
    assert all(0 <= t < 3 for t in tokens)
    assert not any(math.isnan(lp) for lp in logprobs)


def test_seeded_sampling_is_still_reproducible_and_varied():
    params = SamplingParams(temperature=1.0, seed=11)
    rows = torch.zeros(1, 64)
    first = [sample_tokens(rows, [params], [step])[0][0] for step in range(32)]
    assert first == [sample_tokens(rows, [params], [step])[0][0] for step in range(32)]
    assert len(set(first)) > 5  # a uniform distribution really is sampled


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([INF, -INF, NAN]))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(_floats, min_size=5, max_size=5), min_size=1, max_size=4),
    temperature=st.one_of(st.floats(0, 2), st.sampled_from([1e-40, 1e-5, NAN, INF])),
    top_p=st.one_of(st.floats(1e-45, 1.0), st.sampled_from([0.0, NAN])),
    top_k=st.integers(-3, 7),
    seed=st.one_of(st.none(), st.integers(-2**70, 2**70)),
)
def test_the_sampler_never_raises(rows, temperature, top_p, top_k, seed):
    params = _unchecked(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    tokens, logprobs = sample_tokens(torch.tensor(rows), [params] * len(rows), [3] * len(rows))
    assert all(0 <= t < 5 for t in tokens)
    assert not any(math.isnan(lp) for lp in logprobs)
