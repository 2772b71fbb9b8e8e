"""Simulated requests: control-plane `Request`s built from a trace, and what became of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union, overload

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.control.request import Request
from infinite_llm.sampling import SamplingParams


class RepeatedTokens(Sequence[int]):
    """A prompt of `length` copies of one token id, without storing them.

    Cost does not depend on token values, and a trace holds tens of millions of prompt tokens:
    as lists they would take gigabytes. Slices (a prefill chunk) are real lists.
    """

    def __init__(self, token_id: int, length: int) -> None:
        self.token_id = token_id
        self.length = length

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[int, list[int]]:
        if isinstance(index, slice):
            return [self.token_id] * len(range(*index.indices(self.length)))
        if not -self.length <= index < self.length:
            raise IndexError("prompt token index out of range")
        return self.token_id


def make_request(item: TraceRequest, token_id: int = 0) -> Request:
    """A request that generates exactly the trace's output length (EOS is ignored)."""
    params = SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True)
    return Request(
        request_id=item.request_id,
        prompt_token_ids=RepeatedTokens(token_id, item.prompt_len),  # type: ignore[arg-type]
        sampling=params,
        arrival_time=item.arrival_time_s,
        max_total_tokens=item.prompt_len + item.output_len,
    )


@dataclass
class RequestRecord:
    """One trace request's fate in a run (times are simulated seconds)."""

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int  # tokens generated (the trace's output length when completed)
    home: Optional[int] = None
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None
    num_preemptions: int = 0
    rejected: Optional[str] = None  # why it was refused (the exception's name)

    @property
    def completed(self) -> bool:
        return self.finished_s is not None

    @property
    def tokens(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        """Generation speed after the first token (None if not completed or a single token)."""
        if self.finished_s is None or self.first_token_s is None or self.output_len < 2:
            return None
        span = self.finished_s - self.first_token_s
        return (self.output_len - 1) / span if span > 0 else None


__all__ = ["RepeatedTokens", "RequestRecord", "make_request"]
