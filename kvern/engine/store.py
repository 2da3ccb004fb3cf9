"""The block store: KV tensors of full blocks, keyed like kvern's prefix caches, within a budget.

Why one entry per full block under a chained hash: block ``i``'s hash covers
its parent's hash and its own token ids
(:func:`kvern.routing.block_chains.chain_hashes`), so a hash names a whole
prefix, two requests that share a prefix share its entries, and a request's
reuse is the longest run of its leading block hashes found here -- the rule
vLLM's prefix cache and kvern's ``radix`` cache model follow, which is what
lets kvern in front of the engine predict its reuse exactly.

Why a tree of :class:`~kvern.trie.node.TrieNode`: the engine evicts with
kvern's own policies (:mod:`kvern.trie.policies`, ``cost_aware`` by
default), which rank trie leaves by recency, depth and use. Each stored
block is a node whose edge is the block's tokens and whose parent is the
block before it. Only leaves are evicted, so a stored block's parent is
always stored and every stored block is reachable by a prefix walk.

Budget: ``capacity_bytes`` of encoded tensors. Past it, the lowest-ranked
leaves go until the store is under ``low_watermark`` of it (evictions come in
batches: ranking every leaf once per batch, not once per block). An evicted
block goes to the disk tier when there is one (:mod:`kvern.engine.disk_tier`)
and comes back on a hit ("promoted").

Threads: one -- the engine's worker thread -- mutates the store; the stats
are plain ints other threads may read.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvern.engine.kv_codec import EncodedBlock
from kvern.routing.block_chains import HASH_BYTES, ChainHash
from kvern.trie.node import TrieNode
from kvern.trie.policies import EvictionPolicy, make_policy


class ColdTier(Protocol):
    """Where evicted blocks go, and come back from (the disk tier)."""

    def put(self, block_hash: ChainHash, parent: ChainHash | None, block: EncodedBlock) -> None: ...

    def take(self, block_hash: ChainHash) -> EncodedBlock | None:
        """The block stored under ``block_hash`` (it stays on disk too), or None."""
        ...


@dataclass(slots=True)
class StoreStats:
    """Counters since start (the engine's /metrics and /health show them)."""

    lookups: int = 0
    lookup_blocks: int = 0  # blocks asked for (the usable leading full blocks)
    hit_blocks: int = 0  # of them found, in memory or promoted from disk
    promoted_blocks: int = 0  # found on disk and brought back to memory
    stored_blocks: int = 0
    evicted_blocks: int = 0
    evicted_to_disk: int = 0


@dataclass(slots=True, eq=False)
class _Entry:
    node: TrieNode
    block: EncodedBlock
    parent: ChainHash | None  # node.children says whether blocks hang from this one


class BlockStore:
    """Full blocks of KV under chained hashes, a byte budget, policy-ranked eviction."""

    def __init__(
        self,
        block_tokens: int,
        capacity_bytes: int,
        policy: EvictionPolicy | None = None,
        *,
        cold: ColdTier | None = None,
        low_watermark: float = 0.9,
        clock: Callable[[], float],
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.block_tokens = block_tokens
        self.capacity_bytes = capacity_bytes
        self.policy = policy if policy is not None else make_policy("cost_aware")
        self.cold = cold
        self.low_watermark = low_watermark
        self.stats = StoreStats()
        self._clock = clock
        self._entries: dict[ChainHash, _Entry] = {}
        self._root = TrieNode(key=array("i"))
        self._bytes = 0

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        """Bytes of encoded KV held in memory (what the budget counts)."""
        return self._bytes

    def __contains__(self, block_hash: ChainHash) -> bool:
        return block_hash in self._entries

    def lookup(self, hashes: Sequence[ChainHash], tokens: Sequence[int]) -> list[EncodedBlock]:
        """The longest run of ``hashes`` stored (memory, then disk), touched as used now.

        ``hashes`` are the request's usable leading blocks (the caller leaves
        out any block holding the prompt's last token); ``tokens`` its ids.
        """
        now = self._clock()
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(hashes)
        found: list[EncodedBlock] = []
        parent: ChainHash | None = None
        for i, h in enumerate(hashes):
            entry = self._entries.get(h)
            if entry is None and self.cold is not None:
                block = self.cold.take(h)
                if block is not None:
                    entry = self._add(h, parent, self._block_tokens(tokens, i), block)
                    self.stats.promoted_blocks += 1
            if entry is None:
                break
            self._touch(entry.node, now)
            found.append(entry.block)
            parent = h
        self.stats.hit_blocks += len(found)
        self._fit()
        return found

    def position_of(self, block_hash: ChainHash) -> int | None:
        """Where the stored block's first token stands in its sequence (None: not stored)."""
        entry = self._entries.get(block_hash)
        return None if entry is None else entry.node.depth - len(entry.node.key)

    def use(self, hashes: Sequence[ChainHash]) -> list[EncodedBlock]:
        """The stored blocks ``hashes`` (all stored), touched as used now (chunk reuse)."""
        now = self._clock()
        entries = [self._entries[h] for h in hashes]
        for entry in entries:
            self._touch(entry.node, now)
        return [e.block for e in entries]

    def put(
        self,
        hashes: Sequence[ChainHash],
        tokens: Sequence[int],
        encode_block: Callable[[int], EncodedBlock],
    ) -> int:
        """Store the sequence's full blocks not stored yet; ``encode_block(i)`` gives block i.

        Returns how many blocks were added. Blocks already stored are touched
        (another request may have stored them meanwhile); a block whose
        parent is not stored ends the walk (nothing may hang from nothing).
        """
        now = self._clock()
        added = 0
        parent: ChainHash | None = None
        for i, h in enumerate(hashes):
            entry = self._entries.get(h)
            if entry is None:
                if parent is not None and parent not in self._entries:
                    break  # evicted since the lookup: the chain has a hole
                entry = self._add(h, parent, self._block_tokens(tokens, i), encode_block(i))
                added += 1
            self._touch(entry.node, now)
            parent = h
        self.stats.stored_blocks += added
        self._fit()
        return added

    def check_invariants(self) -> None:
        """Recount what the store keeps incrementally (tests call it after each step)."""
        assert self._bytes == sum(e.block.num_bytes for e in self._entries.values())
        for h, entry in self._entries.items():
            if entry.parent is None:
                assert entry.node.parent is self._root
            else:
                assert entry.parent in self._entries, "a stored block's parent was evicted"
                assert entry.node.parent is self._entries[entry.parent].node
            for key in entry.node.children:
                assert self._entries[ChainHash(key.to_bytes(HASH_BYTES, "little"))].parent == h
        assert len(self._root.children) == sum(e.parent is None for e in self._entries.values())

    def _block_tokens(self, tokens: Sequence[int], index: int) -> array[int]:
        size = self.block_tokens
        return array("i", tokens[index * size : (index + 1) * size])

    def _add(
        self, h: ChainHash, parent: ChainHash | None, key: array[int], block: EncodedBlock
    ) -> _Entry:
        above = self._root if parent is None else self._entries[parent].node
        node = TrieNode(key=key, parent=above, depth=above.depth + len(key))
        # Children are keyed by the block's hash, not its first token: two
        # blocks after one parent may start alike. Policies only count them.
        above.children[int.from_bytes(h, "little")] = node
        entry = _Entry(node, block, parent)
        self._entries[h] = entry
        self._bytes += block.num_bytes
        return entry

    def _touch(self, node: TrieNode, now_s: float) -> None:
        node.hit_count += 1
        node.last_access_s = now_s
        self.policy.on_access(node, now_s)

    def _fit(self) -> None:
        """Evict lowest-ranked leaves until under the low watermark, if over the budget.

        One ranking per batch, kept in a heap: a parent whose last child goes
        joins the heap then, so the order is the policy's, block by block.
        """
        if self._bytes <= self.capacity_bytes:
            return
        target = int(self.capacity_bytes * self.low_watermark)
        now = self._clock()
        key = self.policy.sort_key
        heap = [
            (key(e.node, now), i, h)
            for i, (h, e) in enumerate(self._entries.items())
            if not e.node.children
        ]
        heapq.heapify(heap)
        tiebreak = len(self._entries)
        while self._bytes > target and heap:
            rank, _, h = heapq.heappop(heap)
            entry = self._entries[h]
            self.policy.on_evict(entry.node, rank)
            self._remove(h, entry)
            parent = entry.parent
            if parent is not None and not self._entries[parent].node.children:
                tiebreak += 1
                heapq.heappush(heap, (key(self._entries[parent].node, now), tiebreak, parent))

    def _remove(self, h: ChainHash, entry: _Entry) -> None:
        del self._entries[h]
        self._bytes -= entry.block.num_bytes
        node = entry.node
        if node.parent is not None:
            node.parent.children.pop(int.from_bytes(h, "little"), None)
            node.parent = None
        self.stats.evicted_blocks += 1
        if self.cold is not None:
            self.cold.put(h, entry.parent, entry.block)
            self.stats.evicted_to_disk += 1
