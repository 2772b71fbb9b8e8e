"""The creditor side of the rManager protocol (pure Python): what an instance does with
`BorrowRequest`, `ReleaseBlocks` and `AttachBlock` from its peers.

The instance's message pump calls these under the instance lock; the simulator and the
property tests call them directly. A release may name blocks the creditor no longer holds for
that borrower (a duplicate or a late release after a refusal was retried): those are ignored,
so releases are idempotent.
"""

from __future__ import annotations

from infinite_llm.control.messages import AttachBlock, BorrowReply, BorrowRequest, ReleaseBlocks
from infinite_llm.control.rmanager import RManager


def on_borrow(rm: RManager, req: BorrowRequest) -> BorrowReply:
    if req.indices is None:
        refs = rm.reserve(req.borrower, req.request_id, req.num_blocks, req.copy_tags)
    else:
        refs = rm.lend(req.borrower, req.request_id, req.num_blocks, req.indices, yields=req.yields)
    return BorrowReply(req.tag, rm.instance_id, req.request_id, [r.block for r in refs] if refs else None)


def on_release(rm: RManager, msg: ReleaseBlocks) -> list[int]:
    """Free what the borrower gave back; returns the block ids freed."""
    held = set(rm.lent_ledger.get(msg.borrower, {}).get(msg.request_id, []))
    blocks = None if msg.blocks is None else [b for b in msg.blocks if b in held]
    return rm.release_lent(msg.borrower, msg.request_id, blocks)


def on_attach(rm: RManager, msg: AttachBlock) -> None:
    rm.attach(msg.request_id, msg.index, msg.block)
