"""vLLM's pool of KV blocks, replayed: which full blocks it still holds once its cache is full.

Why: kvern's trie keeps every prefix up to its own budget (millions of
tokens), while a vLLM replica holds what fits in its KV cache and evicts the
least recently used blocks to make room. Under load a conversation's earlier
turns are gone from the backend long before kvern's trie forgets them; the
trie alone then over-predicts. Measured on the real vLLM (CPU build, block 32)
with its cache cut to 130 blocks (4,160 tokens), 3 of 300 requests of
bench/truth.py were predicted far above the report (192 vs 32). So when the
backend's capacity is known, the ``radix`` cache model replays its pool.

The rules replayed, as vLLM v1 has them (``vllm/v1/core/block_pool.py``,
``kv_cache_manager.py``, ``single_type_kv_cache_manager.py``):

- ``num_blocks`` blocks of ``block_size`` tokens; one is the null block, never used.
- A full block is known by a chained hash of its parent's hash and its tokens.
- A request's hit is the longest run of its leading full blocks whose hashes
  are cached, capped at ``len(prompt) - 1`` tokens (the last prompt token is
  always computed). Hit blocks leave the free queue while the request runs.
- The rest of the prompt gets new blocks from the head of the free queue; a
  block taken from there loses the hash it had (that is the eviction).
- Full blocks get their hash as they are computed: the prompt's at prefill,
  the answer's as it decodes (all of it but the last sampled token).
- When the request ends its blocks return to the free queue, its last block
  first: those holding no hash (the partly filled last one) to the queue's
  head, to be reused first; the hashed ones to its tail, so cached blocks are
  evicted least recently used first, and a sequence's tail before its head::

      free queue:  head (taken first) ................................. tail
                   [ unhashed: freed, never used | hashed: older ... newer ]

  (vLLM 0.32 ``BlockPool.free_blocks``: unhashed blocks are prepended, hashed
  ones appended; earlier v1 releases appended both, so a partial block could
  push a cached one out.)

Concurrency is replayed as kvern sees it (a request starts at its first byte
and ends with its answer), which is close to vLLM's own order. A request that
finds no free block (every block held by requests in flight) is left with
the blocks it got, as vLLM would make it wait.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NewType

BlockId = NewType("BlockId", int)
BlockHash = NewType("BlockHash", int)

_ROOT_HASH = BlockHash(0)


@dataclass(slots=True)
class Allocation:
    """The blocks one request holds while it runs, in sequence order."""

    # Block ids in sequence order; the last one may be partly filled.
    block_ids: list[BlockId] = field(default_factory=list)
    # Chained hashes of the sequence's full blocks computed so far.
    hashes: list[BlockHash] = field(default_factory=list)


class BlockPool:
    """The replayed pool: free queue (LRU), block hashes, reference counts."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # The free queue's head: unhashed blocks, reused first -- those freed
        # (a stack, the last one freed at its end) and those never handed out
        # yet, ids from ``_next_unused`` up (block 0 is the null block).
        self._unhashed: list[BlockId] = []
        self._next_unused = 1
        # The free queue's tail: hashed blocks no request holds, least recently used first.
        self._lru: OrderedDict[BlockId, None] = OrderedDict()
        self._ref: dict[BlockId, int] = {}  # blocks held by running requests -> holders
        self._hash_of: dict[BlockId, BlockHash] = {}  # blocks holding a full cached block
        # Hash -> the blocks cached under it, oldest first (a hash can be cached twice).
        self._blocks_of: dict[BlockHash, dict[BlockId, None]] = {}

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that hold a full, hashed block (in use or evictable)."""
        return len(self._hash_of)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no running request holds (cached or not)."""
        return len(self._unhashed) + self.num_blocks - self._next_unused + len(self._lru)

    def start(self, prompt: Sequence[int]) -> tuple[int, Allocation]:
        """A request's prefill: its cached tokens, and the blocks it now holds."""
        size = self.block_size
        hashes = self._chain(_ROOT_HASH, prompt, 0, len(prompt) // size)
        alloc = Allocation()
        for h in hashes[: max(0, len(prompt) - 1) // size]:
            cached = self._blocks_of.get(h)
            if not cached:
                break
            block = next(iter(cached))
            self._hold(block)
            alloc.block_ids.append(block)
            alloc.hashes.append(h)
        hit_tokens = len(alloc.block_ids) * size
        self._grow(alloc, prompt, hashes)
        return hit_tokens, alloc

    def finish(self, alloc: Allocation, sequence: Sequence[int] | None) -> None:
        """The request ended holding ``sequence`` (prompt + answer), or only its prompt if None.

        The answer's blocks are allocated and hashed, then every block goes
        back to the free queue, last block first.
        """
        if sequence is not None:
            start = len(alloc.hashes)
            parent = alloc.hashes[-1] if alloc.hashes else _ROOT_HASH
            more = self._chain(parent, sequence, start, len(sequence) // self.block_size)
            self._grow(alloc, sequence, alloc.hashes + more)
        unhashed: list[BlockId] = []
        for block in reversed(alloc.block_ids):
            left = self._ref[block] - 1
            if left:
                self._ref[block] = left
                continue
            del self._ref[block]
            if block in self._hash_of:
                self._lru[block] = None
            else:
                unhashed.append(block)
        self._unhashed.extend(reversed(unhashed))  # the first of them ends up on top
        alloc.block_ids.clear()
        alloc.hashes.clear()

    def check_invariants(self) -> None:
        """Recount what the pool keeps incrementally (tests call this after each step)."""
        held, unhashed, lru = set(self._ref), set(self._unhashed), set(self._lru)
        assert len(unhashed) == len(self._unhashed), "a block freed twice"
        assert not held & (unhashed | lru) and not unhashed & lru, "a block in two places"
        assert len(held | unhashed | lru) == self._next_unused - 1, "a handed-out block was lost"
        assert all(0 < b < self._next_unused for b in held | unhashed | lru), "an id out of range"
        assert lru <= set(self._hash_of) <= held | lru, "the free queue's halves are mixed"
        for block, h in self._hash_of.items():
            assert block in self._blocks_of[h]
        assert sum(len(b) for b in self._blocks_of.values()) == len(self._hash_of)
        assert all(self._blocks_of.values()), "an empty hash entry was kept"

    def _grow(self, alloc: Allocation, tokens: Sequence[int], hashes: list[BlockHash]) -> None:
        """Give ``alloc`` blocks for all of ``tokens`` and hash its newly full blocks."""
        size = self.block_size
        needed = -(-len(tokens) // size)
        while len(alloc.block_ids) < needed:
            block = self._take_free()
            if block is None:
                break  # vLLM would queue the request; what it got stays allocated
            alloc.block_ids.append(block)
        for i in range(len(alloc.hashes), min(len(hashes), len(alloc.block_ids))):
            self._cache(alloc.block_ids[i], hashes[i])
            alloc.hashes.append(hashes[i])

    def _chain(
        self, parent: BlockHash, tokens: Sequence[int], first: int, last: int
    ) -> list[BlockHash]:
        """Hashes of full blocks ``first`` .. ``last - 1`` of ``tokens``, chained on ``parent``."""
        size = self.block_size
        out: list[BlockHash] = []
        for b in range(first, last):
            parent = BlockHash(hash((parent, tuple(tokens[b * size : (b + 1) * size]))))
            out.append(parent)
        return out

    def _hold(self, block: BlockId) -> None:
        """A hit: the block (hashed) leaves the free queue while the request runs."""
        count = self._ref.get(block, 0)
        if count == 0:
            del self._lru[block]
        self._ref[block] = count + 1

    def _take_free(self) -> BlockId | None:
        """The free queue's head, its cached block (if any) evicted; None if none is free."""
        if self._unhashed:
            block = self._unhashed.pop()
        elif self._next_unused < self.num_blocks:
            block = BlockId(self._next_unused)
            self._next_unused += 1
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            old = self._hash_of.pop(block)
            same = self._blocks_of[old]
            del same[block]
            if not same:
                del self._blocks_of[old]
        else:
            return None
        self._ref[block] = 1
        return block

    def _cache(self, block: BlockId, h: BlockHash) -> None:
        if block in self._hash_of:
            return  # a hit block already carries this hash
        self._hash_of[block] = h
        self._blocks_of.setdefault(h, {})[block] = None
