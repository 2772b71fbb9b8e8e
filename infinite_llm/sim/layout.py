"""Where a request's KV tokens live, per instance, below a position (pure Python).

Pricing a step needs, for every request in the batch, how many of its KV tokens each instance
holds up to the end of the step's chunk (what each holder's MicroAttention reads) and how many of
the chunk's new tokens have their slots there (KV written with the query). The block table can
be thousands of blocks long (a 2M-token context at 256 tokens a block), so walking it every step
would dominate the simulation. `KVLayout` answers from the home's per-instance block counts when
the chunk reaches the end of the table (every decode step), and otherwise from a per-request
index of which table positions each instance holds, rebuilt only when the table changed.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from infinite_llm.control.home_kv import HomeKV


@dataclass
class _Index:
    key: tuple
    positions: dict[int, list[int]]  # instance -> sorted table positions it holds


class KVLayout:
    """Per-instance KV token counts of the requests homed on one instance."""

    def __init__(self, kv: HomeKV) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self._index: dict[str, _Index] = {}

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def tokens_below(self, request_id: str, pos: int, version: tuple) -> dict[int, int]:
        """instance -> the request's KV tokens in [0, pos) held there.

        `version` must change whenever the table's content changes other than by growing
        (a committed migration, a preemption); growth is detected from the length.
        """
        if pos <= 0:
            return {}
        bs = self.block_size
        table = self.kv.block_table(request_id)
        nb = -(-pos // bs)
        if nb > len(table):
            raise ValueError(f"request {request_id!r}: block table has {len(table)} blocks, {nb} are needed for {pos} tokens")
        counts = self.kv.holders(request_id)
        if len(counts) == 1:
            return {next(iter(counts)): pos}
        if nb == len(table):
            tokens = {i: n * bs for i, n in counts.items()}
            tokens[table[nb - 1].instance] -= nb * bs - pos  # the last block is partly filled
            return tokens
        positions = self._positions(request_id, table, version)
        tokens = {}
        for instance, held in positions.items():
            n = bisect_left(held, nb)  # blocks at positions < nb
            if n:
                tokens[instance] = n * bs
        tokens[table[nb - 1].instance] -= nb * bs - pos
        return tokens

    def _positions(self, request_id: str, table: list, version: tuple) -> dict[int, list[int]]:
        key = (id(table), len(table), version)
        cached = self._index.get(request_id)
        if cached is not None and cached.key == key:
            return cached.positions
        positions: dict[int, list[int]] = {}
        for index, ref in enumerate(table):
            positions.setdefault(ref.instance, []).append(index)
        self._index[request_id] = _Index(key, positions)
        return positions


__all__ = ["KVLayout"]
