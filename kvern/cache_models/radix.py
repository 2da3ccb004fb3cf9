"""vLLM- and SGLang-style backends: one shared prefix cache for every request.

vLLM hashes full KV blocks (16 tokens by default) and reuses the longest run
of cached full blocks; SGLang's radix cache reuses any prefix (page size 1).
Both always compute the prompt's last token (the logits for the first output
token come from it), so at most ``prompt_tokens - 1`` tokens, rounded down to
whole blocks, can be reported as cached.

The trie holds what the backend holds as long as kvern's trie budget and
eviction track the backend's capacity; per-upstream capacity modelling comes
with routing.
"""

from __future__ import annotations

from array import array
from typing import Any

from kvern.cache_models.base import StartResult
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode


class SharedPrefixCache:
    """Predicts ``floor(min(LCP, n - 1) / block) * block``."""

    name = "radix"

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def start(self, trie: RadixTrie, prompt: array[int], now_s: float) -> StartResult:
        if not prompt:
            return StartResult(0, None)
        lcp = trie.match(prompt).matched_tokens
        usable = min(lcp, len(prompt) - 1)
        return StartResult(usable // self.block_size * self.block_size, None)

    def finish(self, trie: RadixTrie, handle: Any, held: TrieNode | None, now_s: float) -> None:
        return None

    def release(self, trie: RadixTrie) -> None:
        return None  # it locks nothing: the trie is its whole state
