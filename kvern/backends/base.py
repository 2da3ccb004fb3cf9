"""The cache-model protocol and the factory choosing one from the config."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Protocol

from kvern.config import CacheModelConfig
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode


@dataclass(slots=True)
class StartResult:
    """The prediction for one request, and the model's handle on it."""

    predicted_cached_tokens: int  # what the backend should report as cached
    handle: Any  # passed back to ``finish`` (a slot, or None)


class CacheModel(Protocol):
    """How one backend reuses its KV cache.

    ``start`` is called on the tracking thread when the request's prefill is
    done (first byte), BEFORE its prompt is inserted into the trie, so the trie
    still shows what existed before it. ``finish`` is called once the answer
    ended, with the node of the sequence the backend now holds (the prompt,
    plus the generated tokens when the backend keeps them). Both may lock and
    unlock trie nodes to keep what the backend holds from being evicted.
    """

    name: str
    block_size: int

    def start(self, trie: RadixTrie, prompt: array[int], now_s: float) -> StartResult: ...

    def finish(self, trie: RadixTrie, handle: Any, held: TrieNode | None, now_s: float) -> None: ...


def build_cache_model(config: CacheModelConfig, default_block_size: int) -> CacheModel:
    """The cache model the config names (one per upstream and model)."""
    if config.kind == "llamacpp":
        from kvern.backends.llamacpp import LlamaCppSlots

        return LlamaCppSlots(
            num_slots=config.slots,
            slot_prompt_similarity=config.slot_prompt_similarity,
            cache_ram=config.cache_ram,
            cache_ram_tokens=config.cache_ram_tokens,
        )
    from kvern.backends.radix import SharedPrefixCache

    return SharedPrefixCache(config.block_size or default_block_size)
