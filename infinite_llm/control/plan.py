"""The step plan: what the control plane tells every instance to do in one step.

Pure Python (no torch). The same StepPlan object is sent to every instance; each instance
derives from it, deterministically, which queries it ships to which peer and which guest
queries it will receive, so no shapes need to be negotiated at run time.
"""

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
    """One request's share of a step (a prefill chunk or one decode token).

    `block_table` lists the request's blocks in sequence order: token at absolute position p
    lives in block_table[p // block_size] at slot p % block_size. It covers at least
    `start_pos + len(token_ids)` tokens. The forward pass runs on `home`; attention over
    blocks held elsewhere is done there by MicroAttention on shipped queries.
    """

    request_id: str
    home: int
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


@dataclass(frozen=True)
class BlockMove:
    """Copy one full, immutable block's KV (all layers) from `src` to `dst` (migration)."""

    src: BlockRef
    dst: BlockRef


@dataclass
class StepPlan:
    step_id: int
    block_size: int
    seqs: list[SeqWork] = field(default_factory=list)
    # Block copies the instances run in the background during this step (the tables in `seqs`
    # still point at `src`); each instance finishes its copies before it executes the next plan,
    # whose tables point at `dst`.
    migrations: list[BlockMove] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.seqs and not self.migrations


@dataclass
class SampleResult:
    """What an instance returns for a SeqWork with sample=True."""

    request_id: str
    token_id: int
    logprob: Optional[float] = None
