"""A request as the control plane sees it (pure Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from infinite_llm.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context capacity
    ABORT = "abort"  # client went away / explicit abort


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    # Hard cap on prompt + output tokens (what the cluster can hold for this request).
    max_total_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    home: Optional[int] = None
    # Tokens whose KV is in the cache. Reset to 0 by preemption (recompute).
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without joining the whole (possibly 2M-token) context."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - self.num_prompt_tokens
        if self.sampling.max_tokens is None:
            return room
        return min(self.sampling.max_tokens, room)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
