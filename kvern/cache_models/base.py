"""The cache-model protocol every model of a backend's cache implements, and its result."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, Protocol

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

    def release(self, trie: RadixTrie) -> None:
        """Forget what the backend holds, unlocking its nodes (the model is being replaced)."""
        ...
