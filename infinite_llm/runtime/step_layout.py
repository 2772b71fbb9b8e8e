"""Who computes, sends and receives what in one step, derived from the shared StepPlan.

Every instance builds its own `StepLayout` from the same plan, so the layouts of any two
instances agree on the messages between them without negotiation. Nothing here is per layer:
the layout is built once per step and reused by every layer's exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.control.plan import SeqWork, StepPlan


@dataclass
class SegmentBlocks:
    """The blocks of one sequence held by one instance, as MicroAttention wants them."""

    block_ids: list[int]
    block_starts: list[int]
    block_lens: list[int]


@dataclass
class RemoteSeq:
    """A sequence whose attention involves two instances (home and one holder)."""

    seq_index: int  # index into plan.seqs
    num_queries: int
    write_token_indices: list[int]  # new tokens (indices within the chunk) whose slots are on the holder


@dataclass
class StepLayout:
    rank: int
    own: list[int] = field(default_factory=list)  # indices of plan.seqs homed here
    own_row_start: list[int] = field(default_factory=list)  # row of each own seq in the step's tokens
    num_own_tokens: int = 0
    # Local KV writes: (row in own tokens, flat slot) for own new tokens whose slot is here.
    local_write_rows: list[int] = field(default_factory=list)
    local_write_slots: list[int] = field(default_factory=list)
    # seq index -> blocks held here (own and guest sequences).
    local_blocks: dict[int, SegmentBlocks] = field(default_factory=dict)
    # Queries this instance ships: peer -> own sequences with blocks on that peer.
    send_to: dict[int, list[RemoteSeq]] = field(default_factory=dict)
    # Guest queries this instance serves: peer (their home) -> their sequences with blocks here.
    recv_from: dict[int, list[RemoteSeq]] = field(default_factory=dict)

    @property
    def is_distributed(self) -> bool:
        return bool(self.send_to or self.recv_from)


def _holders(work: SeqWork, block_size: int) -> dict[int, list[int]]:
    """instance -> indices (into block_table) of the blocks it holds that have visible tokens."""
    num_blocks = -(-work.end_pos // block_size)
    if len(work.block_table) < num_blocks:
        raise ValueError(
            f"request {work.request_id!r}: block table has {len(work.block_table)} blocks, "
            f"{num_blocks} needed for {work.end_pos} tokens"
        )
    holders: dict[int, list[int]] = {}
    for index in range(num_blocks):
        holders.setdefault(work.block_table[index].instance, []).append(index)
    return holders


def _write_indices(work: SeqWork, block_size: int, instance: int) -> list[int]:
    return [
        j
        for j in range(len(work.token_ids))
        if work.block_table[(work.start_pos + j) // block_size].instance == instance
    ]


def build_step_layout(plan: StepPlan, rank: int) -> StepLayout:
    bs = plan.block_size
    layout = StepLayout(rank=rank)
    row = 0
    for seq_index, work in enumerate(plan.seqs):
        holders = _holders(work, bs)
        if rank in holders:
            indices = holders[rank]
            layout.local_blocks[seq_index] = SegmentBlocks(
                block_ids=[work.block_table[i].block for i in indices],
                block_starts=[i * bs for i in indices],
                block_lens=[min(bs, work.end_pos - i * bs) for i in indices],
            )
        if work.home == rank:
            layout.own.append(seq_index)
            layout.own_row_start.append(row)
            for j in range(len(work.token_ids)):
                pos = work.start_pos + j
                ref = work.block_table[pos // bs]
                if ref.instance == rank:
                    layout.local_write_rows.append(row + j)
                    layout.local_write_slots.append(ref.block * bs + pos % bs)
            for peer in sorted(holders):
                if peer == rank:
                    continue
                layout.send_to.setdefault(peer, []).append(
                    RemoteSeq(seq_index, len(work.token_ids), _write_indices(work, bs, peer))
                )
            row += len(work.token_ids)
        elif rank in holders:
            layout.recv_from.setdefault(work.home, []).append(
                RemoteSeq(seq_index, len(work.token_ids), _write_indices(work, bs, rank))
            )
    layout.num_own_tokens = row
    return layout
