"""A backend prefix cache of a given size, request by request: what ``--capacity-tokens`` models.

Why: offline there is no backend to report what it kept, so without a size
every prompt's shared prefix counts as reused. Given one, this LRU over
chained full blocks -- the model of :mod:`kvern.diagnosis.capacity` and of
its brute-force reference :mod:`kvern.diagnosis.lru_reference`, one request
at a time -- says what a cache that small would have served; what kvern's
trie saw shared but the cache had dropped is then ``evicted``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvern.diagnosis.capacity import block_ids


class LruBlocks:
    """An LRU cache of ``capacity_tokens // block_size`` blocks."""

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, not {block_size}")
        self.block_size = block_size
        self.capacity_blocks = max(0, capacity_tokens) // block_size
        self._cache: OrderedDict[int, None] = OrderedDict()

    def access(self, ids: Sequence[int]) -> int:
        """Serve one prompt: the tokens reused (its blocks up to the first missing one)."""
        cache, capacity = self._cache, self.capacity_blocks
        reused, intact = 0, True
        for block in block_ids(ids, self.block_size):
            if block in cache:
                cache.move_to_end(block)
                if intact:
                    reused += 1
                continue
            intact = False
            if capacity == 0:
                continue
            cache[block] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
        return reused * self.block_size

    def __len__(self) -> int:
        return len(self._cache)
