"""Token sampling on the home instance: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from infinite_llm.sampling import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) pairs apart


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per (seed, number of tokens generated so far): the draw does not depend on
    # batch composition, placement or preemption, so a seeded request is reproducible.
    generator = torch.Generator()
    generator.manual_seed((seed * _SEED_MIX + step) % (1 << 63))
    return generator


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    num_generated: Sequence[int],
    default_generator: Optional[torch.Generator] = None,
) -> tuple[list[int], list[float]]:
    """Sample one token per row of `logits` [N, V] (float32). Returns (token ids, logprobs)."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    tokens: list[int] = []
    logprobs: list[float] = []
    greedy = torch.argmax(logits, dim=-1).tolist()
    for row, p in enumerate(params):
        if p.greedy:
            token = greedy[row]
        else:
            scaled = _filter_top_k_top_p(logits[row].cpu() / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(scaled, dim=-1)
            generator = (
                _step_generator(p.seed, num_generated[row]) if p.seed is not None else default_generator
            )
            token = int(torch.multinomial(probs, 1, generator=generator).item())
        tokens.append(int(token))
        logprobs.append(float(logprobs_all[row, token]))
    return tokens, logprobs
