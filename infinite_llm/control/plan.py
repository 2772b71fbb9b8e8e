"""What one instance's scheduler hands its model runner for one step (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from infinite_llm.sampling import SamplingParams


@dataclass(frozen=True, order=True)
class BlockRef:
    """A KV block somewhere in the cluster: block `block` of instance `instance`'s pool."""

    instance: int
    block: int


@dataclass
class SeqWork:
    """One request's share of a step on its home (a prefill chunk or one decode token).

    `block_table` lists the request's blocks in sequence order: token at absolute position p
    lives in block_table[p // block_size] at slot p % block_size. It covers at least
    `start_pos + len(token_ids)` tokens. Blocks held elsewhere are attended to there, by the
    holder's attention service, on the queries this step ships.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[BlockRef]
    sample: bool  # sample a next token after this chunk (decode, or the last prefill chunk)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Number of tokens generated so far; with `sampling.seed` it seeds this step's draw so the
    # output does not depend on batching, placement or preemption.
    num_generated: int = 0

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class SampleResult:
    """What the runner returns for a SeqWork with sample=True (error: this request failed)."""

    request_id: str
    token_id: int
    logprob: Optional[float] = None
    error: Optional[str] = None
