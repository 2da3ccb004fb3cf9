"""The brute-force reference for the capacity curve: an actual LRU prefix cache, simulated.

Why keep a slow one: :mod:`kvern.diagnosis.capacity` computes every capacity
in one pass through an argument (Mattson's stack inclusion) that is easy to
get subtly wrong -- which blocks count, what a miss does to later blocks of
the same request, off-by-one at the capacity. This one does literally what
the model says, one capacity per call, with nothing clever in it; the tests
and ``bench/capacity_curve.py`` hold the fast one to it, token for token.

The model: blocks are the chained :func:`~kvern.diagnosis.capacity.block_ids`
of full blocks; each request accesses its blocks in order; a cached block is
moved to most recent, a missing one inserted as most recent and the least
recent evicted past ``capacity_blocks``; a request reuses its blocks up to
(not including) its first missing one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvern.diagnosis.capacity import block_ids


def simulate_lru(
    requests: Iterable[Sequence[int]], block_size: int, capacity_blocks: int
) -> int:
    """Prompt tokens an LRU prefix cache of ``capacity_blocks`` blocks reuses over ``requests``."""
    blocks = (block_ids(ids, block_size) for ids in requests)
    return simulate_lru_blocks(blocks, capacity_blocks) * block_size


def simulate_lru_blocks(requests: Iterable[Sequence[int]], capacity_blocks: int) -> int:
    """Blocks reused, each request given as its block ids (hash once, simulate many sizes)."""
    cache: OrderedDict[int, None] = OrderedDict()
    reused = 0
    for blocks in requests:
        prefix_intact = True
        for block in blocks:
            if block in cache:
                cache.move_to_end(block)
                if prefix_intact:
                    reused += 1
            else:
                prefix_intact = False
                cache[block] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return reused
