"""How much KV cache this traffic needs: a miss-ratio curve from one pass (Mattson's algorithm).

Why: "token reuse 62 %" does not say whether a bigger cache would help. The
curve does -- for every capacity at once, the share of prompt tokens a prefix
cache of that size would have served -- so an operator sees where adding GPU
memory stops paying (the knee) and what the traffic reuses at best.

What is modelled, exactly (vLLM's automatic prefix caching):

- A prompt's token ids are cut into full blocks of ``block_size`` tokens; a
  trailing partial block is never cached. Block i is named by a chained hash
  of blocks 0..i (:func:`block_ids`), so equal ids mean equal prefixes.
- The cache is LRU over blocks, ``C`` blocks large. A request accesses its
  blocks in order 0..n-1, every one of them: a cached block is touched (made
  most recent), a missing one is inserted as most recent, evicting the least
  recent. The request *reuses* block i only if blocks 0..i were all cached
  when accessed: after its first missing block it reuses nothing more, but
  its later blocks are still touched or inserted (the backend computes and
  caches them).

Mattson et al. (1970): for an LRU cache, an access hits at capacity ``C``
iff its *stack distance* -- the number of distinct blocks accessed since the
previous access to the same block, infinite for a first access -- is below
``C``. The access trace above is the same at every capacity (every block is
accessed, hit or not), so the stack inclusion property holds and one pass
gives the hits of every capacity. A request reuses, at capacity ``C``, its
leading blocks whose *running maximum* of distances stays below ``C``; each
block's running maximum goes to a histogram, and the reused blocks at ``C``
are the histogram's count below ``C``. The result is exactly what an LRU
simulation at ``C`` gives (:mod:`kvern.diagnosis.lru_reference`; the tests
check equality on random traces).

Distances in O(log n): every access gets a timestamp; a timestamp is *dead*
once its block is accessed again (or forgotten, below). The distance of an
access at ``t`` to a block last accessed at ``p`` is the number of live
timestamps in (p, t): ``t - 1 - p`` minus the dead ones there, counted by a
Fenwick tree over timestamps. Two shortcuts keep it cheap on chat traffic,
where a request re-sends the blocks of an earlier one in order: consecutive
blocks whose previous timestamps are consecutive have equal distances (one
query per run, not per block), and such a run dies as one range, added to
the tree once at its first timestamp (a query at a live ``p`` never falls
inside a dead range, so a range counts whole or not at all).

Bounded memory (the live curve, fed for as long as kvern runs): with
``max_blocks`` set, at most that many distinct blocks are tracked; beyond
it the least recently used is forgotten, and its next access counts as a
first one. That block had ``max_blocks`` other distinct blocks accessed
since, so its true distance was at least ``max_blocks``: it misses at every
capacity up to ``max_blocks`` either way. The curve is therefore exact for
capacities up to ``max_blocks`` and a lower bound above (points say which).
Timestamps are renumbered 1..k (in recency order) whenever the tree fills,
and the tree is kept at least twice the tracked blocks, so renumbering costs
O(1) amortised per access and the tree never grows with the number of
accesses. A tracked block costs about 270 bytes (measured: its ordered-dict
entry with the id and timestamp objects, its share of the tree and of the
histogram).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvern.diagnosis.kv_size import kv_bytes_per_token

__all__ = [
    "CurvePoint",
    "StackDistanceCurve",
    "block_ids",
    "format_curve",
    "kv_bytes_per_token",
]

GIB = 1 << 30
# The smallest Fenwick tree kept (timestamps): renumbering less often than this is pointless.
_MIN_TREE_SLOTS = 1024


def block_ids(ids: Sequence[int], block_size: int) -> list[int]:
    """Chained 64-bit ids of the full blocks of ``ids``: block i's id names tokens 0..(i+1)*bs.

    Why blake2b of (previous id, the block's tokens as 32-bit integers):
    chaining makes equal ids mean equal prefixes, as vLLM's block hashes do;
    blake2b is as fast here as Python's ``hash`` of a tuple (~30 ns a token at
    16-token blocks, one call per block), and unlike it is the same in every
    Python version and process, so ids written down compare across runs. At
    64 bits, a collision among a billion blocks has a chance of about 3 %.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}")
    raw = ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)
    data = memoryview(raw.tobytes())
    step = block_size * raw.itemsize
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    out: list[int] = []
    prev = bytes(8)
    for offset in range(0, (len(raw) // block_size) * step, step):
        h = blake2b(prev, digest_size=8)
        h.update(data[offset : offset + step])
        prev = h.digest()
        out.append(from_bytes(prev, "little"))
    return out


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """The token reuse of an LRU prefix cache of one capacity, over the traffic seen."""

    capacity_tokens: int  # capacity_blocks * block_size
    capacity_blocks: int  # LRU cache size in blocks
    reused_tokens: int  # prompt tokens served from that cache (whole blocks)
    reuse_share: float  # reused_tokens / every prompt token seen (0 with none)
    gib: float | None  # capacity_tokens * kv_bytes_per_token / 2**30, when known
    exact: bool  # False: above max_blocks, where the figure is a lower bound

    def to_dict(self) -> dict[str, Any]:
        return {
            "capacity_tokens": self.capacity_tokens,
            "capacity_blocks": self.capacity_blocks,
            "reused_tokens": self.reused_tokens,
            "reuse_share": self.reuse_share,
            "gib": self.gib,
            "exact": self.exact,
        }


class StackDistanceCurve:
    """Requests in arrival order in, the miss-ratio curve of an LRU prefix cache out.

    ``add`` costs O(blocks) dict operations plus O(log n) per run of blocks
    re-sent in their earlier order; ``curve`` costs O(tracked blocks). Not
    thread-safe: one thread feeds and reads it (the tracking thread, live).
    """

    def __init__(
        self,
        block_size: int,
        *,
        max_blocks: int | None = None,
        kv_bytes_per_token: int | None = None,
        min_tree_slots: int = _MIN_TREE_SLOTS,
    ) -> None:
        """``min_tree_slots``: the smallest timestamp tree (tiny in tests: renumber often)."""
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, not {block_size}")
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be at least 1, not {max_blocks}")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.kv_bytes_per_token = kv_bytes_per_token
        self.num_requests = 0
        self.total_tokens = 0  # every prompt token seen, partial blocks included
        self.num_accesses = 0  # blocks accessed
        # First accesses (forgotten blocks accessed again count once more): the
        # distinct blocks seen, exactly, when nothing was forgotten.
        self.distinct_blocks = 0
        self.num_forgotten = 0
        self.num_renumbers = 0  # times the timestamps were renumbered (the tree filled)
        # Block id -> timestamp of its last access, least recent first.
        self._last: OrderedDict[int, int] = OrderedDict()
        self._now = 1  # the next access's timestamp (1-based, for the Fenwick tree)
        self._dead_total = 0
        self._min_tree_slots = max(1, min_tree_slots)
        self._tree = _zeros(self._min_tree_slots + 1)  # Fenwick tree of dead timestamps
        # Running maximum of distances -> blocks accessed with it (finite ones only).
        self._by_running_max = _zeros(16)

    # -- feeding -------------------------------------------------------------------

    @property
    def tracked_blocks(self) -> int:
        return len(self._last)

    def add(self, ids: Sequence[int]) -> None:
        """One request's prompt token ids, in arrival order."""
        self.add_blocks(block_ids(ids, self.block_size), len(ids))

    def add_blocks(self, blocks: Sequence[int], num_tokens: int) -> None:
        """One request given as its block ids (:func:`block_ids`) and its prompt length."""
        self.num_requests += 1
        self.total_tokens += num_tokens
        n = len(blocks)
        if n == 0:
            return
        self._make_room(n)
        last, tree = self._last, self._tree
        pop, forget = last.pop, last.popitem
        limit = self.max_blocks if self.max_blocks is not None else n + len(last)
        t = self._now
        running, same = -1, 0  # the running maximum of distances; blocks counted at it
        reusable = True  # no block of this request was new so far
        prev_p = -2  # the previous block's old timestamp
        dead_a, dead_b = 0, -1  # timestamps [a, b] just killed, not yet in the tree
        for b in blocks:
            p = pop(b, None)
            last[b] = t  # most recent now
            t += 1
            if p is None:
                self.distinct_blocks += 1
                reusable = False
                if len(last) <= limit:
                    continue
                p = forget(last=False)[1]  # its timestamp dies: see the module docstring
                self.num_forgotten += 1
            elif reusable:
                if p != prev_p + 1:  # else: the same distance as the block before
                    if dead_b >= dead_a:
                        self._kill(dead_a, dead_b)
                        dead_a, dead_b = 0, -1
                    dead_before, i = 0, p
                    while i > 0:
                        dead_before += tree[i]
                        i &= i - 1
                    # Accesses strictly between p and this one (at t - 1), less the dead.
                    d = (t - 2 - p) - (self._dead_total - dead_before)
                    if d > running:
                        self._count(running, same)
                        running, same = d, 0
                prev_p = p
                same += 1
            if p == dead_b + 1:
                dead_b = p
            else:
                if dead_b >= dead_a:
                    self._kill(dead_a, dead_b)
                dead_a = dead_b = p
        if dead_b >= dead_a:
            self._kill(dead_a, dead_b)
        self._count(running, same)
        assert t - 1 < len(tree)
        self._now = t
        self.num_accesses += n

    def _count(self, running_max: int, num_blocks: int) -> None:
        """``num_blocks`` blocks were reused at every capacity above ``running_max`` blocks."""
        if num_blocks == 0:
            return
        hist = self._by_running_max
        if running_max >= len(hist):
            hist.extend(_zeros(max(running_max + 1, 2 * len(hist)) - len(hist)))
        hist[running_max] += num_blocks

    def _kill(self, a: int, b: int) -> None:
        """Timestamps a..b are dead: one Fenwick update of b - a + 1 at a."""
        tree, size, count = self._tree, len(self._tree) - 1, b - a + 1
        self._dead_total += count
        i = a
        while i <= size:
            tree[i] += count
            i += i & -i

    def _make_room(self, n: int) -> None:
        """Renumber the live timestamps 1..k, and grow the tree, unless n more fit now."""
        size = len(self._tree) - 1
        if self._now - 1 + n <= size:
            return
        live = len(self._last)
        # At least twice the tracked blocks: the next renumbering is >= live accesses away.
        size = max(size, 2 * live + 2 * n, self._min_tree_slots)
        for stamp, block in enumerate(self._last, 1):
            self._last[block] = stamp
        self._now = live + 1
        self.num_renumbers += 1
        self._dead_total = 0
        self._tree = _zeros(size + 1)

    # -- reading -------------------------------------------------------------------

    def reused_blocks(self, capacity_blocks: int) -> int:
        """Blocks an LRU prefix cache of ``capacity_blocks`` blocks would have reused."""
        if capacity_blocks <= 0:
            return 0
        return sum(self._by_running_max[:capacity_blocks])

    def reused_tokens(self, capacity_blocks: int) -> int:
        return self.reused_blocks(capacity_blocks) * self.block_size

    def default_capacities_blocks(self) -> list[int]:
        """Powers of two from one block up to every distinct block, then that many (all of it).

        Capped at ``max_blocks`` when set: beyond it no capacity is exact.
        """
        top = max(1, self.distinct_blocks)
        if self.max_blocks is not None:
            top = min(top, self.max_blocks)
        out, c = [], 1
        while c < top:
            out.append(c)
            c *= 2
        out.append(top)
        return out

    def curve(self, capacities_tokens: Iterable[int] | None = None) -> list[CurvePoint]:
        """One point per capacity (tokens; rounded down to whole blocks), in increasing order."""
        bs = self.block_size
        if capacities_tokens is None:
            blocks = self.default_capacities_blocks()
        else:
            blocks = sorted({max(0, int(c)) // bs for c in capacities_tokens})
        out: list[CurvePoint] = []
        reused, counted = 0, 0
        for c in blocks:
            upto = min(c, len(self._by_running_max))
            if upto > counted:
                reused += sum(self._by_running_max[counted:upto])
                counted = upto
            tokens = reused * bs
            kv = self.kv_bytes_per_token
            out.append(
                CurvePoint(
                    capacity_tokens=c * bs,
                    capacity_blocks=c,
                    reused_tokens=tokens,
                    reuse_share=tokens / self.total_tokens if self.total_tokens else 0.0,
                    gib=c * bs * kv / GIB if kv is not None else None,
                    exact=self.max_blocks is None or c <= self.max_blocks,
                )
            )
        return out

    def check_invariants(self) -> None:
        """Recount what is kept incrementally (tests call it after every request)."""
        stamps = list(self._last.values())
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert all(0 < s < self._now for s in stamps)
        size = len(self._tree) - 1
        assert self._now - 1 <= size
        # Every timestamp before now is live (a tracked block's) or counted dead.
        assert self._dead_total + len(stamps) == self._now - 1
        dead = 0
        i = size
        while i > 0:
            dead += self._tree[i]
            i &= i - 1
        assert dead == self._dead_total
        if self.max_blocks is not None:
            assert len(self._last) <= self.max_blocks
        assert sum(self._by_running_max) <= self.num_accesses


def _zeros(n: int) -> array[int]:
    return array("q", bytes(8 * n))


def format_curve(points: Sequence[CurvePoint], *, total_tokens: int) -> list[str]:
    """The curve as aligned text lines, for a terminal."""
    lines = [f"{'capacity tokens':>16} {'GiB':>9} {'reused tokens':>14} {'reuse':>7}"]
    for p in points:
        gib = f"{p.gib:9.3f}" if p.gib is not None else f"{'-':>9}"
        mark = "" if p.exact else "  (at least: above the tracked bound)"
        lines.append(
            f"{p.capacity_tokens:>16,} {gib} {p.reused_tokens:>14,} {p.reuse_share:>7.1%}{mark}"
        )
    lines.append(f"of {total_tokens:,} prompt tokens")
    return lines
