"""Backend cache models, pure: the rules they replay, on hand-built token sequences."""

from __future__ import annotations

from array import array

import pytest

from kvern.cache_models.llamacpp import LlamaCppSlots, PromptPath, nodes_common_prefix
from kvern.cache_models.radix import SharedPrefixCache
from kvern.trie import RadixTrie
from kvern.trie.invariants import check_trie


def seq(*runs: tuple[int, int]) -> array[int]:
    """Concatenate ranges: seq((0, 10), (100, 105)) = 0..9 then 100..104."""
    out = array("i")
    for start, stop in runs:
        out.extend(range(start, stop))
    return out


def serve_request(model: LlamaCppSlots, trie: RadixTrie, prompt: array[int], gen: int = 0) -> int:
    """What the tracker does for one request: start, insert, finish with prompt + answer."""
    start = model.start(trie, prompt, 0.0)
    node = trie.insert(prompt, 0.0).node
    trie.lock(node)
    held = node
    if gen:
        full = array("i", prompt)
        full.extend(range(9000, 9000 + gen))
        held = trie.insert(full, 0.0).node
    model.finish(trie, start.handle, held, 0.0)
    trie.unlock(node)
    check_trie(trie)
    return start.predicted_cached_tokens


def test_shared_prefix_cache_counts_whole_blocks_and_leaves_the_last_token() -> None:
    trie = RadixTrie()
    model = SharedPrefixCache(16)
    trie.insert(seq((0, 40)), 0.0)
    assert model.start(trie, seq((0, 40), (50, 60)), 0.0).predicted_cached_tokens == 32
    # The whole prompt cached: the last token is still computed, so 39 -> 32.
    assert model.start(trie, seq((0, 40)), 0.0).predicted_cached_tokens == 32
    assert SharedPrefixCache(1).start(trie, seq((0, 40)), 0.0).predicted_cached_tokens == 39
    with pytest.raises(ValueError, match="block_size"):
        SharedPrefixCache(0)


def test_one_slot_reuses_prompt_and_answer_but_always_evaluates_one_token() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1)
    assert serve_request(model, trie, seq((0, 50)), gen=5) == 0
    # Next turn: the old prompt, 4 of 5 answer tokens (the last was never fed back), more.
    nxt = seq((0, 50), (9000, 9004), (60, 70))
    assert serve_request(model, trie, nxt) == 54
    assert serve_request(model, trie, nxt) == len(nxt) - 1


def test_slot_with_similar_prompt_is_chosen_over_the_lru_one() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=2, cache_ram=False)
    serve_request(model, trie, seq((0, 100)))  # slot 0 (LRU tie: the last idle one wins)
    serve_request(model, trie, seq((1000, 1100)))  # dissimilar: LRU slot
    a, b = (s.held for s in model.slots)
    assert a is not None and b is not None
    assert (a.depth, b.depth, nodes_common_prefix(a, b)) == (100, 100, 0)
    assert serve_request(model, trie, seq((0, 100), (200, 210))) == 100
    assert serve_request(model, trie, seq((1000, 1100), (200, 210))) == 100


def test_no_ram_cache_one_slot_forgets_the_other_tenant() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1, cache_ram=False)
    serve_request(model, trie, seq((0, 100)))
    serve_request(model, trie, seq((1000, 1100)))
    assert serve_request(model, trie, seq((0, 100), (5, 9))) == 0
    # kvern's trie still knows the prefix: the slot model is what gets it right.
    assert trie.match(seq((0, 100), (5, 9))).matched_tokens == 104


def test_ram_cache_restores_the_other_tenant_into_the_slot() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1, cache_ram=True)
    serve_request(model, trie, seq((0, 100)))
    serve_request(model, trie, seq((1000, 1100)))  # LRU: saves tenant A's sequence
    assert [n.depth for n in model.cached] == [100]
    assert serve_request(model, trie, seq((0, 100), (5, 9))) == 100
    # Tenant B's sequence went to the cache, A's left it for the slot.
    assert [n.depth for n in model.cached] == [100]
    assert trie.prefix_tokens(model.cached[0])[0] == 1000


def test_ram_cache_token_limit_drops_the_oldest() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1, cache_ram_tokens=150)
    for base in (0, 1000, 2000):
        serve_request(model, trie, seq((base, base + 100)))
    assert [trie.prefix_tokens(n)[0] for n in model.cached] == [1000]


def test_prompt_path_common_prefix_matches_a_naive_lcp() -> None:
    trie = RadixTrie()
    sequences = [seq((0, 30)), seq((0, 10), (50, 70)), seq((0, 30), (80, 90)), seq((5, 25))]
    nodes = [trie.insert(s, 0.0).node for s in sequences]
    for prompt in (seq((0, 12)), seq((0, 30), (80, 85)), seq((0, 10), (50, 55), (1, 2)), seq()):
        path = PromptPath(trie, prompt)
        for node, s in zip(nodes, sequences, strict=True):
            naive = next(
                (i for i, (a, b) in enumerate(zip(s, prompt, strict=False)) if a != b),
                min(len(s), len(prompt)),
            )
            assert path.common_prefix(node) == naive


def test_idle_slot_saved_at_task_launch_is_loaded_back_after_its_slot_moved_on() -> None:
    """--cache-idle-slots: launching a task saves every idle slot's sequence.

    Slot 0 serves S+T, then moves on to S+U (similar enough to keep it, so no
    save on the way). Only the idle save at r3's launch put S+T in the RAM
    cache; r5, long enough to fall under the similarity threshold, lands on
    the LRU slot (1) and loads S+T from there.
    """
    x, s, t, u = seq((0, 100)), seq((1000, 1060)), seq((2000, 2040)), seq((3000, 3040))
    history = [x, s + t, x + seq((100, 110)), s + u, s + t + seq((4000, 4500))]
    for idle_slots, last in ((True, 100), (False, 0)):
        trie = RadixTrie()
        model = LlamaCppSlots(num_slots=2, cache_idle_slots=idle_slots)
        assert [serve_request(model, trie, p) for p in history] == [0, 0, 100, 60, last]


def test_idle_slot_save_keeps_one_copy_of_each_sequence() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=2)
    serve_request(model, trie, seq((0, 100)))  # slot 1
    serve_request(model, trie, seq((1000, 1020)))  # slot 0; slot 1 (idle) saved
    serve_request(model, trie, seq((0, 100), (100, 110)))  # slot 1; slot 0 saved
    serve_request(model, trie, seq((1000, 1020), (5, 8)))  # slot 0; slot 1's longer one replaces
    assert [(trie.prefix_tokens(n)[0], n.depth) for n in model.cached] == [(1000, 20), (0, 110)]
    # One slot: the only slot is the one working, so nothing is ever idle.
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1)
    serve_request(model, trie, seq((0, 100)))
    serve_request(model, trie, seq((0, 100), (100, 110)))
    assert list(model.cached) == []


def test_unified_kv_clears_idle_slots_so_a_short_share_is_not_reused() -> None:
    """With a unified KV cache (llama-server without -np) idle slots are saved, then cleared.

    r3 shares 20 of slot 1's 100 tokens. Kept in the slot, the similarity
    rule would reuse them; cleared into the RAM cache, that entry keeps less
    than a quarter of itself and is not loaded ("don't trash large prompts").
    """
    history = [seq((0, 100)), seq((1000, 1020)), seq((0, 20), (5000, 5020))]
    for unified, last in ((False, 20), (True, 0)):
        trie = RadixTrie()
        model = LlamaCppSlots(num_slots=2, kv_unified=unified)
        assert [serve_request(model, trie, p) for p in history] == [0, 0, last]
        held = [s.held is not None for s in model.slots]
        assert held == ([True, True] if not unified else [False, True])


def test_ram_cache_skips_a_sequence_larger_than_its_limit() -> None:
    trie, model = RadixTrie(), LlamaCppSlots(num_slots=1, cache_ram_tokens=150)
    serve_request(model, trie, seq((0, 100)))
    serve_request(model, trie, seq((1000, 1200)))  # saves the 100
    serve_request(model, trie, seq((2000, 2010)))  # the 200 alone is over the limit: kept out
    assert [trie.prefix_tokens(n)[0] for n in model.cached] == [0]
