"""The per-step exchange layout: both sides of every message agree, derived from one plan."""

from __future__ import annotations

import random

import pytest

from infinite_llm.control.plan import BlockRef, SeqWork, StepPlan
from infinite_llm.runtime.step_layout import build_step_layout


def _plan(rng: random.Random, num_instances: int, bs: int = 4) -> StepPlan:
    plan = StepPlan(step_id=1, block_size=bs)
    next_block = [0] * num_instances
    for s in range(rng.randint(1, 6)):
        start = rng.randint(0, 30)
        n = rng.choice([1, 1, rng.randint(1, 12)])
        blocks = -(-(start + n) // bs)
        table = []
        for _ in range(blocks):
            inst = rng.randrange(num_instances)
            table.append(BlockRef(inst, next_block[inst]))
            next_block[inst] += 1
        plan.seqs.append(SeqWork(f"r{s}", rng.randrange(num_instances), list(range(n)), start, table, sample=True))
    return plan


@pytest.mark.parametrize("seed", range(30))
def test_send_and_receive_layouts_mirror_each_other(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    plan = _plan(rng, n)
    layouts = [build_step_layout(plan, r) for r in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            sent = [(x.seq_index, x.num_queries, x.write_token_indices) for x in layouts[a].send_to.get(b, [])]
            got = [(x.seq_index, x.num_queries, x.write_token_indices) for x in layouts[b].recv_from.get(a, [])]
            assert sent == got
    # Every new token is written exactly once, on the instance its slot lives on.
    writes = 0
    for r, layout in enumerate(layouts):
        writes += len(layout.local_write_slots)
        writes += sum(len(x.write_token_indices) for seqs in layout.recv_from.values() for x in seqs)
    assert writes == sum(len(w.token_ids) for w in plan.seqs)
    # Every visible block is attended by exactly one instance.
    for i, work in enumerate(plan.seqs):
        held = sum(len(l.local_blocks[i].block_ids) for l in layouts if i in l.local_blocks)
        assert held == -(-work.end_pos // plan.block_size)


def test_short_block_table_is_rejected():
    plan = StepPlan(step_id=1, block_size=4)
    plan.seqs.append(SeqWork("r", 0, [1, 2, 3], 3, [BlockRef(0, 0)], sample=True))
    with pytest.raises(ValueError, match="block table"):
        build_step_layout(plan, 0)
