"""The batched sampler: unseeded rows drawn together (one noise draw, no per-row generator, host
copy or multinomial), the right distribution under temperature / top-k / top-p, seeded rows
reproducible whatever their batch, greedy rows exact."""

from __future__ import annotations

import math

import pytest
import torch

import infinite_llm.instance.sampler as sampler
from infinite_llm.instance.sampler import sample_tokens
from infinite_llm.sampling import SamplingParams

PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = [math.log(p) + 3.0 for p in PROBS]  # any shift: softmax(LOGITS) == PROBS


def _normalized(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


@pytest.fixture
def calls(monkeypatch):
    """Counts of the per-row work the batched path must not do, and of noise draws."""
    counts = {"step_generator": 0, "cpu": 0, "exponential_": 0}
    real_step, real_cpu, real_exp = sampler._step_generator, torch.Tensor.cpu, torch.Tensor.exponential_

    def counted(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    def no_multinomial(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(sampler, "_step_generator", counted("step_generator", real_step))
    monkeypatch.setattr(torch.Tensor, "cpu", counted("cpu", real_cpu))
    monkeypatch.setattr(torch.Tensor, "exponential_", counted("exponential_", real_exp))
    monkeypatch.setattr(torch, "multinomial", no_multinomial)
    return counts


def test_unseeded_rows_are_sampled_in_one_draw(calls):
    kinds = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=3),
             SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.0)]
    params = kinds * 8
    logits = torch.randn(len(params), 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(logits, params, [0] * len(params), torch.Generator().manual_seed(1))
    assert calls == {"step_generator": 0, "cpu": 0, "exponential_": 1}
    greedy_rows = [r for r, p in enumerate(params) if p.temperature == 0.0]
    assert [tokens[r] for r in greedy_rows] == logits[greedy_rows].argmax(dim=-1).tolist()
    want = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert logprobs == pytest.approx(want.tolist(), abs=1e-6)


def test_only_seeded_rows_get_generators_of_their_own(calls):
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, seed=6), SamplingParams(temperature=0.0)]
    sample_tokens(torch.zeros(4, 50), params, [0] * 4, torch.Generator().manual_seed(1))
    assert calls["step_generator"] == 2
    assert calls["exponential_"] == 1 + 2  # the unseeded rows' draw, then one per seeded row


# (sampling params, the distribution they make of PROBS, worked out by hand)
CASES = [
    (SamplingParams(temperature=1.0), PROBS),
    (SamplingParams(temperature=0.5), _normalized([p**2 for p in PROBS])),
    (SamplingParams(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0.0, 0.0]),
    # Mass before each token: 0, .5, .75, .9; tokens whose preceding mass reaches .8 are cut.
    (SamplingParams(temperature=1.0, top_p=0.8), _normalized(PROBS[:3]) + [0.0]),
    (SamplingParams(temperature=2.0, top_k=3), _normalized([p**0.5 for p in PROBS[:3]]) + [0.0]),
]


def test_batched_draw_follows_each_rows_distribution():
    """All cases in one batch (each row filtered and scaled by its own params); a fixed seed and a
    loose bound: 3,000 draws per case put the frequencies within ~0.01 (one sigma) of the truth."""
    per_case = 3000
    params = [p for p, _ in CASES for _ in range(per_case)]
    logits = torch.tensor([LOGITS] * len(params))
    tokens, _ = sample_tokens(logits, params, [0] * len(params), torch.Generator().manual_seed(123))
    for c, (_, want) in enumerate(CASES):
        drawn = torch.tensor(tokens[c * per_case : (c + 1) * per_case])
        freq = torch.bincount(drawn, minlength=len(PROBS)).double() / per_case
        assert freq.tolist() == pytest.approx(want, abs=0.04), f"case {c}: {freq.tolist()} vs {want}"
        assert all(freq[i] == 0.0 for i, w in enumerate(want) if w == 0.0)  # filtered tokens never win


def test_seeded_rows_do_not_depend_on_their_batch():
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    row = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    alone = [sample_tokens(row, [seeded], [step])[0][0] for step in range(20)]
    others = torch.randn(5, 64)
    for step in range(20):
        batch = torch.cat([others[:2], row, others[2:]])
        params = [SamplingParams(temperature=1.0)] * 2 + [seeded] + [SamplingParams(temperature=0.5)] * 3
        tokens, _ = sample_tokens(batch, params, [step] * 6, torch.Generator().manual_seed(step))
        assert tokens[2] == alone[step]
    assert len(set(alone)) > 5


def test_greedy_takes_the_first_of_equal_maxima_as_argmax_does():
    """transformers' greedy decoding is argmax (first maximum); tied logits must agree."""
    logits = torch.zeros(3, 32000)
    logits[0, [5, 100, 31999]] = 1.0
    logits[1, [31999, 7]] = 2.0  # the later index set first
    tokens, _ = sample_tokens(logits, [SamplingParams(temperature=0.0)] * 3, [0] * 3)
    assert tokens == [5, 7, 0] == torch.argmax(logits, dim=-1).tolist()
