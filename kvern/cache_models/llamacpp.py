"""llama.cpp's server (and Ollama's llama.cpp runner): per-slot caches plus a RAM prompt cache.

llama-server does not share one prefix cache between requests. Each of its
``-np`` slots holds ONE token sequence: the last prompt it processed plus the
tokens it generated (all but the last sampled one, which was never fed back).
What a request reuses is the longest common prefix (LCP) with the sequence of
the slot it lands on, and at least one prompt token is always evaluated. With
``--cache-ram`` (on by default) slot sequences that are about to be lost are
saved to a RAM prompt cache and can be loaded back into a slot. This module
replays the server's own rules (tools/server, ``get_available_slot`` and
``server_prompt_cache``), on the request order kvern sees:

1. Slot choice: among idle slots holding tokens, the one with the highest
   similarity ``LCP / prompt_tokens`` above ``slot_prompt_similarity`` (0.1 by
   default); if none qualifies, the least recently used idle slot.
2. Prompt cache (only with cache_ram): when the slot was chosen by LRU, or by
   similarity while keeping less than half of its sequence, the slot's
   sequence is saved (unless the cache already holds a sequence containing
   it; cached sequences it contains are dropped), then the cached sequence
   that beats the slot's own on both kept share and similarity, among those
   that keep at least a quarter of themselves, is loaded into the slot (and
   leaves the cache). The oldest cached sequences are dropped past the
   token limit.
3. Reported cached tokens: ``min(LCP(slot sequence, prompt), prompt_tokens - 1)``.

Sequences are kept as locked trie nodes: the trie already stores every token
sequence, so a slot costs one reference, and the LCP of a sequence with a new
prompt is the depth where their paths part.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from kvern.cache_models.base import StartResult
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode


@dataclass(slots=True, eq=False)
class _Slot:
    """One server slot."""

    index: int  # slot id
    held: TrieNode | None = None  # end of the sequence it holds (locked), None when empty
    last_used: int = 0  # logical time of its last release (LRU choice)
    busy: bool = False  # processing a request


class PromptPath:
    """A prompt's matched path in the trie, for LCPs against many held sequences.

    The LCP of a held sequence with the prompt is found by walking up from the
    held node to the first node on the prompt's path: O(depth in nodes), with
    no token comparisons.
    """

    def __init__(self, trie: RadixTrie, prompt: array[int]) -> None:
        match = trie.match(prompt)
        self.length = len(prompt)
        self.matched = match.matched_tokens
        self.end = match.node
        self.on_path: set[int] = set()
        node: TrieNode | None = match.node
        while node is not None:
            self.on_path.add(id(node))
            node = node.parent

    def common_prefix(self, held: TrieNode | None) -> int:
        x = held
        while x is not None and id(x) not in self.on_path:
            x = x.parent
        if x is None:
            return 0
        if x is self.end:
            return self.matched
        return x.depth


def nodes_common_prefix(a: TrieNode, b: TrieNode) -> int:
    """LCP of the sequences ending at two trie nodes: the depth where their paths meet."""
    seen: set[int] = set()
    node: TrieNode | None = a
    while node is not None:
        seen.add(id(node))
        node = node.parent
    x: TrieNode | None = b
    while x is not None and id(x) not in seen:
        x = x.parent
    return 0 if x is None else x.depth


class LlamaCppSlots:
    """Replays llama-server's slot selection and prompt cache to predict its reuse."""

    name = "llamacpp"
    block_size = 1

    def __init__(
        self,
        *,
        num_slots: int = 1,
        slot_prompt_similarity: float = 0.1,
        cache_ram: bool = True,
        cache_ram_tokens: int | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.slots = [_Slot(i) for i in range(num_slots)]
        self.similarity = slot_prompt_similarity
        self.cache_ram = cache_ram
        self.cache_ram_tokens = cache_ram_tokens
        self.cached: deque[TrieNode] = deque()  # the RAM prompt cache, oldest first
        self._clock = 0

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _size(node: TrieNode | None) -> int:
        return 0 if node is None else node.depth

    def _pick_slot(self, path: PromptPath) -> tuple[_Slot | None, bool]:
        """Return (slot, update_cache) the way get_available_slot does."""
        n = path.length
        best: _Slot | None = None
        if self.similarity != 0.0:
            best_sim = 0.0
            for slot in self.slots:
                if slot.busy or slot.held is None:
                    continue
                sim = path.common_prefix(slot.held) / n
                if sim > best_sim and sim > self.similarity:
                    best_sim, best = sim, slot
            if best is not None:
                keep = best_sim * n / self._size(best.held)
                return best, keep < 0.5
        lru: _Slot | None = None
        for slot in self.slots:
            if slot.busy:
                continue
            if lru is None or slot.last_used <= lru.last_used:
                lru = slot
        return lru, lru is not None

    def _save(self, trie: RadixTrie, held: TrieNode) -> None:
        """server_prompt_cache::alloc: store the slot's sequence unless already contained."""
        for node in self.cached:
            if nodes_common_prefix(node, held) == held.depth:
                return  # already contained in a cached sequence
        kept: deque[TrieNode] = deque()
        for node in self.cached:
            if nodes_common_prefix(node, held) == node.depth:
                trie.unlock(node)  # fully contained in the new entry: obsolete
            else:
                kept.append(node)
        self.cached = kept
        trie.lock(held)
        self.cached.append(held)
        self._trim(trie)

    def _trim(self, trie: RadixTrie) -> None:
        if self.cache_ram_tokens is None:
            return
        total = sum(n.depth for n in self.cached)
        while self.cached and total > self.cache_ram_tokens:
            oldest = self.cached.popleft()
            total -= oldest.depth
            trie.unlock(oldest)

    def _load(self, trie: RadixTrie, slot: _Slot, path: PromptPath) -> None:
        """server_prompt_cache::load: move a better cached sequence into the slot."""
        n = path.length
        lcp_best = path.common_prefix(slot.held)
        size = self._size(slot.held)
        keep_best = lcp_best / size if size > 0 else -1.0
        sim_best = lcp_best / n
        chosen: TrieNode | None = None
        for node in self.cached:
            lcp = path.common_prefix(node)
            keep = lcp / node.depth if node.depth else 0.0
            sim = lcp / n
            if keep < 0.25:
                continue
            if keep_best < keep and sim_best < sim:
                keep_best, sim_best, chosen = keep, sim, node
        if chosen is not None:
            self.cached.remove(chosen)
            if slot.held is not None:
                trie.unlock(slot.held)
            slot.held = chosen  # the cache's lock now belongs to the slot

    # -- the protocol ------------------------------------------------------------

    def start(self, trie: RadixTrie, prompt: array[int], now_s: float) -> StartResult:
        if not prompt:
            return StartResult(0, None)
        path = PromptPath(trie, prompt)
        slot, update_cache = self._pick_slot(path)
        if slot is None:
            # Every slot busy: the server would queue it; predict against the
            # best-matching slot anyway (it is what will free up).
            slot = max(self.slots, key=lambda s: path.common_prefix(s.held))
        if update_cache and self.cache_ram:
            if slot.held is not None:
                self._save(trie, slot.held)
            self._load(trie, slot, path)
        lcp = path.common_prefix(slot.held)
        slot.busy = True
        return StartResult(min(lcp, len(prompt) - 1), slot)

    def finish(self, trie: RadixTrie, handle: Any, held: TrieNode | None, now_s: float) -> None:
        if not isinstance(handle, _Slot):
            return
        slot = handle
        if held is not None:
            trie.lock(held)
        if slot.held is not None:
            trie.unlock(slot.held)
        slot.held = held
        slot.busy = False
        self._clock += 1
        slot.last_used = self._clock
