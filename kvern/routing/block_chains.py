"""Prompts as chains of block hashes, and what other kvern instances sent to each upstream.

Why chained block hashes: kvern instances sharing modelled presence need a
key for "this prefix, on that upstream" that every instance computes alike
from the same tokenizer, and that is small on the wire. As vLLM keys its
prefix cache, block ``i``'s hash covers block ``i - 1``'s hash and block
``i``'s token ids, so a hash stands for the whole prefix up to its block::

    h0 = blake2b(ZERO   || ids[0:B])      B = the upstream's block size
    h1 = blake2b(h0     || ids[B:2B])     (token ids as little-endian int32)
    h2 = blake2b(h1     || ids[2B:3B])    ... full blocks only

Why an LRU of hashes per (model, upstream), bounded by the upstream's
``kv_capacity_tokens / block_size`` blocks: that is what the replica can hold,
so what other instances sent there longer ago than that has been evicted
(as :mod:`kvern.routing.presence` models for this instance's own trie). A
chain is touched leaf first, so its root is the most recently used and tails
go before the prefixes they hang from.

Threads: :meth:`ChainIndex.add` runs on the thread reading the shared stream,
:meth:`ChainIndex.held_tokens` on the tracking thread; a lock covers the
LRUs, held for one chunk of dictionary operations at a time, and hashing is
done outside it.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NewType

from kvern.routing.presence_match import UpstreamCache

ChainHash = NewType("ChainHash", bytes)  # 8 bytes: one block and every block before it

HASH_BYTES = 8
_ROOT = bytes(HASH_BYTES)
# Hashes touched or checked per hold of the lock.
_CHUNK = 256


def token_bytes(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32, the bytes every instance hashes alike."""
    packed = ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)
    if sys.byteorder == "big":
        packed = array("i", packed)
        packed.byteswap()
    return packed.tobytes()


def chain_hashes(
    data: bytes, block_size: int, *, start: int = 0, parent: bytes = _ROOT, limit: int | None = None
) -> list[ChainHash]:
    """Chained hashes of ``data``'s full blocks from block ``start`` (``parent``: the one before).

    ``data`` is :func:`token_bytes`; ``limit`` stops after that many hashes.
    """
    step = block_size * 4
    view = memoryview(data)
    end = len(view) - len(view) % step
    if limit is not None:
        end = min(end, (start + limit) * step)
    out: list[ChainHash] = []
    blake2b = hashlib.blake2b
    for offset in range(start * step, end, step):
        h = blake2b(parent, digest_size=HASH_BYTES)
        h.update(view[offset : offset + step])
        parent = h.digest()
        out.append(ChainHash(parent))
    return out


def split_hashes(packed: bytes) -> list[ChainHash]:
    """A published chain (the hashes back to back) as a list."""
    n = HASH_BYTES
    return [ChainHash(packed[i : i + n]) for i in range(0, len(packed) - len(packed) % n, n)]


class _Chain:
    """One prompt's chain at one block size, computed as far as a lookup needs."""

    def __init__(self, data: bytes, block_size: int) -> None:
        self.data = data
        self.block_size = block_size
        self.hashes: list[ChainHash] = []
        self.num_blocks = len(data) // (4 * block_size)

    def upto(self, n: int) -> list[ChainHash]:
        """The first ``n`` hashes (fewer when the prompt has fewer full blocks)."""
        have = len(self.hashes)
        if n > have and have < self.num_blocks:
            parent = self.hashes[-1] if self.hashes else _ROOT
            more = chain_hashes(
                self.data, self.block_size, start=have, parent=parent, limit=n - have
            )
            self.hashes.extend(more)
        return self.hashes[:n]


class ChainIndex:
    """Per (model, upstream): the chain hashes other instances sent there, least recent first."""

    def __init__(self, caches: Iterable[UpstreamCache]) -> None:
        self.caches = {c.name: c for c in caches}
        self._lock = threading.Lock()
        self._lrus: dict[tuple[str, str], OrderedDict[ChainHash, None]] = {}
        self.evicted = 0  # hashes dropped by an LRU bound
        # The last prompt looked up (the tracking thread asks about the same
        # prompt once per upstream, then again for the chosen one).
        self._memo_ids: Sequence[int] | None = None
        self._memo_len = -1
        self._memo_data = b""
        self._memo: dict[int, _Chain] = {}  # block size -> the chain so far

    def capacity_blocks(self, upstream: str) -> int:
        cache = self.caches[upstream]
        return max(1, cache.capacity_tokens // cache.block_size)

    def add(self, model: str, upstream: str, block_size: int, hashes: Sequence[ChainHash]) -> bool:
        """Another instance sent this chain to ``upstream``; False when it cannot be kept here.

        It cannot when this instance does not know the upstream or models it
        with another block size (the configs disagree: the hashes would never match).
        """
        cache = self.caches.get(upstream)
        if cache is None or cache.block_size != block_size:
            return False
        cap = self.capacity_blocks(upstream)
        key = (model, upstream)
        # Past the capacity the replica cannot hold the whole chain: its head is what counts.
        newest_first = list(reversed(hashes[:cap]))
        # Leaf first: the root ends up the most recently used.
        for i in range(0, len(newest_first), _CHUNK):
            with self._lock:
                lru = self._lrus.setdefault(key, OrderedDict())
                for h in newest_first[i : i + _CHUNK]:
                    lru[h] = None
                    lru.move_to_end(h)
                while len(lru) > cap:
                    lru.popitem(last=False)
                    self.evicted += 1
        return True

    def held_tokens(self, model: str, upstream: str, ids: Sequence[int]) -> int | None:
        """Tokens of the longest prefix of ``ids`` whose chain other instances sent to ``upstream``.

        None when nothing was shared about that upstream for that model.
        Hashes are computed a chunk at a time, as far as the held prefix
        reaches, and kept for the next upstream's lookup of the same prompt.
        """
        key = (model, upstream)
        lru = self._lrus.get(key)
        cache = self.caches.get(upstream)
        if lru is None or cache is None:
            return None
        chain = self._chain(ids, cache.block_size)
        held = 0
        want = _CHUNK // 8
        while held < chain.num_blocks:
            hashes = chain.upto(min(chain.num_blocks, held + want))
            with self._lock:
                for h in hashes[held:]:
                    if h not in lru:
                        return held * cache.block_size
                    held += 1
            want *= 2
        return held * cache.block_size

    def _chain(self, ids: Sequence[int], block_size: int) -> _Chain:
        if ids is not self._memo_ids or len(ids) != self._memo_len:
            self._memo_ids, self._memo_len = ids, len(ids)
            self._memo_data = token_bytes(ids)
            self._memo = {}
        chain = self._memo.get(block_size)
        if chain is None:
            chain = self._memo[block_size] = _Chain(self._memo_data, block_size)
        return chain

    def drop_upstream(self, upstream: str) -> None:
        """Forget every chain sent to ``upstream``, for every model."""
        with self._lock:
            for key in [k for k in self._lrus if k[1] == upstream]:
                del self._lrus[key]

    def stats(self) -> dict[str, int]:
        """Hashes kept (all LRUs together), LRUs, and those dropped by a bound."""
        with self._lock:
            kept = sum(len(lru) for lru in self._lrus.values())
            return {"hashes": kept, "lrus": len(self._lrus), "evicted": self.evicted}

    def check_invariants(self) -> None:
        """Every LRU within its upstream's capacity in blocks (tests)."""
        with self._lock:
            for (_, upstream), lru in self._lrus.items():
                assert len(lru) <= self.capacity_blocks(upstream), (upstream, len(lru))
