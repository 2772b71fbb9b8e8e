"""Token sampling on the home instance: greedy, temperature, top-k, top-p, per-request seeds.

Numerically safe whatever the logits or parameters: `SamplingParams.validate()` rejects bad
values at the API, but the sampler runs in the engine's step, where one request's exception
would take the whole engine down. So NaN/inf logits are sanitized, temperatures below
`GREEDY_TEMPERATURE` (or non-finite ones) decode greedily, probabilities are computed in float32
from `logits - max` (never overflowing), and a row left with no positive mass falls back to argmax.
Nothing non-finite ever reaches `torch.multinomial`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from infinite_llm.sampling import GREEDY_TEMPERATURE, SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) pairs apart
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per (seed, number of tokens generated so far): the draw does not depend on
    # batch composition, placement or preemption, so a seeded request is reproducible.
    generator = torch.Generator()
    generator.manual_seed((seed * _SEED_MIX + step) % (1 << 63))
    return generator


def _sanitize(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN -> -inf (a broken score never wins) and +inf -> float32 max
    (tokens scored +inf share the mass instead of turning the softmax into NaN), each row
    shifted so its maximum is 0 (exp() can then never overflow, whatever the temperature)."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    # A row that is all -inf has max -inf; shifting by it would give NaN (-inf - -inf).
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return logits - row_max


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p. The most likely token is always kept,
        # even for a top_p so small (or a row so degenerate) that the comparison says otherwise.
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def _is_greedy(p: SamplingParams) -> bool:
    # A non-finite temperature can only come from a caller that skipped validate(); decoding it
    # greedily is the one choice that cannot produce NaN probabilities.
    return not math.isfinite(p.temperature) or p.greedy


def _sample_row(shifted: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator]) -> Optional[int]:
    """Draw one token from one sanitized row; None when no token has positive probability."""
    # shifted <= 0 with a maximum of 0, so dividing by any temperature >= GREEDY_TEMPERATURE
    # gives values in [-inf, 0] and the softmax has at least one entry equal to exp(0) = 1.
    scaled = shifted / max(float(p.temperature), GREEDY_TEMPERATURE)
    scaled = _filter_top_k_top_p(scaled, p.top_k, p.top_p)
    probs = torch.nan_to_num(torch.softmax(scaled, dim=-1), nan=0.0, posinf=0.0, neginf=0.0)
    if not float(probs.sum()) > 0.0:
        return None
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    num_generated: Sequence[int],
    default_generator: Optional[torch.Generator] = None,
) -> tuple[list[int], list[float]]:
    """Sample one token per row of `logits` [N, V]. Returns (token ids, logprobs).

    Logprobs are those of the sanitized, unscaled distribution; -inf for a token the model gave
    no mass (only possible for a row with no finite logit, which falls back to argmax).
    """
    shifted = _sanitize(logits)
    logprobs_all = torch.nan_to_num(torch.log_softmax(shifted, dim=-1), nan=float("-inf"))
    greedy = torch.argmax(shifted, dim=-1).tolist()
    tokens: list[int] = []
    logprobs: list[float] = []
    for row, p in enumerate(params):
        token: Optional[int] = None
        if not _is_greedy(p):
            generator = (
                _step_generator(p.seed, num_generated[row]) if p.seed is not None else default_generator
            )
            token = _sample_row(shifted[row].cpu(), p, generator)
        if token is None:
            token = int(greedy[row])
        tokens.append(token)
        logprobs.append(float(logprobs_all[row, token]))
    return tokens, logprobs
