"""Sampling parameters (pure Python; validated once, at the API boundary)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Temperatures below this are greedy. Dividing logits by a tiny temperature overflows float32
# (1e-40 is even a denormal), and the distribution it describes is argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


class SamplingParamError(ValueError):
    """A sampling parameter is out of range; `param` names it as the OpenAI API spells it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `"temperature": true` is a type error at OpenAI too.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(param: str, value: Any) -> float:
    if not _is_number(value):
        raise SamplingParamError(param, f"{param} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingParamError(param, f"{param} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    """Per-request sampling settings, with vLLM/OpenAI meanings.

    temperature: in [0, 2]; anything below `GREEDY_TEMPERATURE` (1e-5), 0 included, is greedy.
    top_p: in (0, 1]; 1 disables nucleus filtering.
    top_k: -1 or 0 disable top-k filtering (vLLM uses -1, some clients send 0); else >= 1.
    max_tokens: >= 1, or None for "until the context is full".
    seed: an integer makes a sampled request reproducible regardless of batching or placement.
    output_kind: what each `RequestOutput` carries, as vLLM's RequestOutputKind: "cumulative"
    (all tokens and text so far: O(length) per step), "delta" (only what is new: O(1) per step;
    streams use it), or "final_only" (one output, when the request finishes).
    Every number must be finite: NaN and infinities are rejected, never passed to the sampler.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise `SamplingParamError` (a ValueError naming the parameter) on the first bad field."""
        temperature = _finite_number("temperature", self.temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise SamplingParamError("temperature", f"temperature must be in [0, {MAX_TEMPERATURE:g}], "
                                                    f"got {self.temperature!r}")
        top_p = _finite_number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamError("top_k", f"top_k must be -1 or 0 (disabled) or a positive integer, "
                                              f"got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise SamplingParamError("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingParamError("seed", f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamError("stop", f"stop strings must be non-empty strings, got {s!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise SamplingParamError("output_kind", f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise SamplingParamError("stop_token_ids", f"stop_token_ids must be token ids (integers >= 0), "
                                                           f"got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
