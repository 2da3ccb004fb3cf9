"""vLLM- and SGLang-style backends: one shared prefix cache for every request.

vLLM hashes full KV blocks (16 tokens by default) and reuses the longest run
of cached full blocks; SGLang's radix cache reuses any prefix (page size 1).
Both always compute the prompt's last token (the logits for the first output
token come from it), so at most ``prompt_tokens - 1`` tokens, rounded down to
whole blocks, can be reported as cached.

Without a capacity the trie stands for what the backend holds, which is right
while the backend's cache is larger than what its requests reuse. Given
vLLM's capacity (``capacity_tokens``, which ``kind: auto`` reads from its
``/metrics``), the model replays vLLM's block pool instead, LRU eviction
included (:mod:`kvern.cache_models.block_pool`).
"""

from __future__ import annotations

from array import array
from typing import Any

from kvern.cache_models.base import StartResult
from kvern.cache_models.block_pool import Allocation, BlockPool
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode


class SharedPrefixCache:
    """Predicts ``floor(min(LCP, n - 1) / block) * block``; LCP from the block pool if sized."""

    name = "radix"

    def __init__(self, block_size: int, capacity_tokens: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool: BlockPool | None = None
        if capacity_tokens is not None:
            self.pool = BlockPool(capacity_tokens // block_size, block_size)

    def start(self, trie: RadixTrie, prompt: array[int], now_s: float) -> StartResult:
        if not prompt:
            return StartResult(0, None)
        if self.pool is not None:
            cached, allocation = self.pool.start(prompt)
            return StartResult(cached, allocation)
        lcp = trie.match(prompt).matched_tokens
        usable = min(lcp, len(prompt) - 1)
        return StartResult(usable // self.block_size * self.block_size, None)

    def finish(self, trie: RadixTrie, handle: Any, held: TrieNode | None, now_s: float) -> None:
        if self.pool is not None and isinstance(handle, Allocation):
            self.pool.finish(handle, None if held is None else trie.prefix_tokens(held))

    def release(self, trie: RadixTrie) -> None:
        return None  # it locks nothing in the trie
