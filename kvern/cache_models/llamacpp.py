"""llama.cpp's server (and Ollama's llama.cpp runner): per-slot caches plus a RAM prompt cache.

llama-server does not share one prefix cache between requests. Each of its
``-np`` slots holds ONE token sequence: the last prompt it processed plus the
tokens it generated (all but the last sampled one, which was never fed back).
What a request reuses is the longest common prefix (LCP) with the sequence of
the slot it lands on, and at least one prompt token is always evaluated. With
``--cache-ram`` (on by default) slot sequences are also saved to a RAM prompt
cache and can be loaded back into a slot. This module replays the server's
own rules (tools/server/server-context.cpp ``get_available_slot`` and
``process_single_task``; server-task.cpp ``server_prompt_cache``), on the
request order kvern sees:

1. Slot choice: among idle slots holding tokens, the one with the highest
   similarity ``LCP / prompt_tokens`` above ``slot_prompt_similarity`` (0.1 by
   default); if none qualifies, the least recently used idle slot.
2. Prompt cache (only with cache_ram): when the slot was chosen by LRU, or by
   similarity while keeping less than half of its sequence, the slot's
   sequence is saved, then the cached sequence that beats the slot's own on
   both kept share and similarity, among those that keep at least a quarter
   of themselves, is loaded into the slot (and leaves the cache).
3. Idle slots (``--cache-idle-slots``, on by default with the RAM cache):
   once a task is launched on its slot, every idle slot's sequence is saved
   too, and with a unified KV cache (``--kv-unified``, what llama-server
   picks when ``-np`` is not given) the idle slot is then cleared.
4. A save is skipped when a cached sequence already contains it, or when it
   alone is over the limit; cached sequences it contains are dropped, and the
   oldest ones go until it fits.
5. Reported cached tokens: ``min(LCP(slot sequence, prompt), prompt_tokens - 1)``.

Not replayed, as they are off in the pinned build's defaults: chunk reuse by
KV shifting (``--cache-reuse N``, default 0; a request may set
``n_cache_reuse``), context shift (``--context-shift``, default off: a full
context stops generation and keeps nothing more), and context checkpoints,
which only SWA (without ``--swa-full``) and recurrent models need. A request
with ``cache_prompt: false`` reuses nothing, which kvern does not see either.

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
        cache_idle_slots: bool = True,
        kv_unified: bool = False,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.slots = [_Slot(i) for i in range(num_slots)]
        self.similarity = slot_prompt_similarity
        self.cache_ram = cache_ram
        self.cache_ram_tokens = cache_ram_tokens
        # llama-server turns idle-slot saves off when there is no RAM cache.
        self.cache_idle_slots = cache_idle_slots and cache_ram
        self.kv_unified = kv_unified
        self.cached: deque[TrieNode] = deque()  # the RAM prompt cache, oldest first
        self._clock = 0

    def release(self, trie: RadixTrie) -> None:
        """Drop every slot's sequence and the RAM cache, unlocking their nodes."""
        for slot in self.slots:
            if slot.held is not None:
                trie.unlock(slot.held)
                slot.held = None
        while self.cached:
            trie.unlock(self.cached.popleft())

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
        """server_prompt_cache::alloc then update: store the slot's sequence.

        Skipped when a cached sequence already contains it (its slot has not
        moved on since the last save) or when it alone is over the limit;
        cached sequences it contains are obsolete. The oldest entries go until
        it fits, as the server drops them by bytes.
        """
        for node in self.cached:
            if nodes_common_prefix(node, held) == held.depth:
                return  # already contained in a cached sequence
        limit = self.cache_ram_tokens
        if limit is not None and held.depth > limit:
            return
        kept: deque[TrieNode] = deque()
        for node in self.cached:
            if nodes_common_prefix(node, held) == node.depth:
                trie.unlock(node)  # fully contained in the new entry: obsolete
            else:
                kept.append(node)
        self.cached = kept
        if limit is not None:
            total = sum(n.depth for n in self.cached)
            while self.cached and total + held.depth > limit:
                oldest = self.cached.popleft()
                total -= oldest.depth
                trie.unlock(oldest)
        trie.lock(held)
        self.cached.append(held)

    def _save_idle_slots(self, trie: RadixTrie) -> None:
        """--cache-idle-slots: after a launch, every idle slot's sequence goes to the cache.

        Why it matters: the copy outlives the slot's own sequence. Once that
        slot moves on to another prompt, or when another slot is the LRU one
        for a prompt too long for the similarity rule, the copy is still
        there to be loaded. With a unified KV cache the idle slot is cleared,
        its room given back to the shared pool.
        """
        for slot in self.slots:
            if slot.busy or slot.held is None:
                continue
            self._save(trie, slot.held)
            if self.kv_unified:
                trie.unlock(slot.held)
                slot.held = None

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
        was_busy, slot.busy = slot.busy, True
        if self.cache_idle_slots and not was_busy:
            self._save_idle_slots(trie)
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
