"""The replayed vLLM block pool: hits, the last-token cap, LRU eviction tail first, sharing.

The rules are vLLM v1's (see kvern/cache_models/block_pool.py); the truth
tests check the replay against a real vLLM with a small KV cache
(tests/test_truth_vllm.py). Here: exact expected figures, and the pool's
invariants recounted after every step.
"""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvern.cache_models.block_pool import Allocation, BlockPool
from kvern.cache_models.radix import SharedPrefixCache
from kvern.trie import RadixTrie

B = 4  # block size in these tests


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def serve(pool: BlockPool, prompt: list[int], answer: list[int] | None = None) -> int:
    """One request start to end; returns its cached tokens."""
    cached, alloc = pool.start(prompt)
    pool.check_invariants()
    pool.finish(alloc, prompt + answer if answer is not None else None)
    pool.check_invariants()
    return cached


def test_a_repeated_prompt_hits_its_full_blocks_but_not_its_last_token() -> None:
    pool = BlockPool(num_blocks=16, block_size=B)
    prompt = tokens(0, 12)  # exactly 3 blocks
    assert serve(pool, prompt) == 0
    # The last token is always computed: the third block cannot be a hit.
    assert serve(pool, prompt) == 8
    assert serve(pool, prompt + [99]) == 12
    assert serve(pool, tokens(0, 6)) == 4


def test_a_partial_block_is_never_cached() -> None:
    pool = BlockPool(num_blocks=16, block_size=B)
    serve(pool, tokens(0, 7))  # one full block, one partial
    assert pool.num_cached_blocks == 1
    assert serve(pool, tokens(0, 9)) == 4


def test_the_answer_is_cached_all_but_its_last_token() -> None:
    """vLLM computes every sampled token but the last; the caller passes exactly those."""
    pool = BlockPool(num_blocks=16, block_size=B)
    serve(pool, tokens(0, 6), answer=tokens(6, 3))  # 9 tokens held: 2 full blocks
    assert pool.num_cached_blocks == 2
    assert serve(pool, tokens(0, 12)) == 8


def test_a_different_block_breaks_the_chain() -> None:
    pool = BlockPool(num_blocks=16, block_size=B)
    serve(pool, tokens(0, 12))
    changed = tokens(0, 12)
    changed[5] = 1000  # second block differs; the third's hash differs with it
    assert serve(pool, changed + [1]) == 4


def test_eviction_takes_unhashed_blocks_then_the_least_recently_used_tail_first() -> None:
    # 5 usable blocks (one is the null block).
    pool = BlockPool(num_blocks=6, block_size=B)
    a, b = tokens(0, 8), tokens(100, 8)  # two blocks each
    serve(pool, a + [0])  # a's 2 blocks cached, plus a partial one
    serve(pool, b + [0])  # b's 2 blocks: 5 blocks used, all free again
    # Three new blocks, none never used: b's partial one (it holds no hash, so
    # it is reused first), then the least recently used hashed ones: a's tail
    # block, then a's head block (a is older than b).
    serve(pool, tokens(200, 9))
    assert serve(pool, b + [1]) == 8  # b untouched
    assert serve(pool, a + [1]) == 0  # a evicted


def test_a_hit_makes_blocks_recent_again() -> None:
    pool = BlockPool(num_blocks=6, block_size=B)
    a, b = tokens(0, 8), tokens(100, 8)
    serve(pool, a + [0])
    serve(pool, b + [0])
    assert serve(pool, a + [0]) == 8  # a is now newer than b
    serve(pool, tokens(200, 9))  # needs 3 blocks: a's partial, then b's tail and head
    assert serve(pool, a + [0]) == 8
    assert serve(pool, b + [0]) == 0


def test_blocks_in_use_are_never_evicted_and_are_shared() -> None:
    pool = BlockPool(num_blocks=6, block_size=B)
    shared = tokens(0, 8)
    cached, first = pool.start(shared + [1])
    assert cached == 0
    cached, second = pool.start(shared + [2])  # shares the 2 full blocks, 1 new partial
    assert cached == 8
    pool.check_invariants()
    assert pool.num_free_blocks == 5 - 4
    # A third request wants 3 blocks: only one is free; it gets that one.
    cached, third = pool.start(tokens(300, 12))
    assert cached == 0 and len(third.block_ids) == 1
    for alloc in (first, second, third):
        pool.finish(alloc, None)
        pool.check_invariants()
    assert serve(pool, shared + [3]) == 8


def test_the_same_block_cached_twice_survives_one_copy_evicted() -> None:
    pool = BlockPool(num_blocks=8, block_size=B)
    prompt = tokens(0, 4)  # one block, never a hit (last-token cap): a new copy each time
    serve(pool, prompt)
    serve(pool, prompt)
    assert pool.num_cached_blocks == 2
    assert serve(pool, prompt + [9]) == 4


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks=1, block_size=B)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(num_blocks=8, block_size=0)


def test_radix_with_a_capacity_replays_the_pool_and_without_one_reads_the_trie() -> None:
    trie = RadixTrie()
    sized = SharedPrefixCache(B, capacity_tokens=8 * B)  # 7 usable blocks
    unsized = SharedPrefixCache(B)
    first, second = array("i", tokens(0, 20)), array("i", tokens(100, 20))  # 5 blocks each
    for ids in (first, second):
        start = sized.start(trie, ids, 0.0)
        assert start.predicted_cached_tokens == 0 and isinstance(start.handle, Allocation)
        sized.finish(trie, start.handle, trie.insert(ids, 0.0).node, 0.0)
    # kvern's trie still holds the first prompt whole; the backend evicted
    # its last three blocks (tail first) to make room for the second.
    assert unsized.start(trie, first, 1.0).predicted_cached_tokens == 16
    assert sized.start(trie, first, 1.0).predicted_cached_tokens == 8


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # which of 4 conversations
            st.integers(1, 9),  # tokens it adds
            st.booleans(),  # whether the answer is kept
        ),
        max_size=40,
    ),
    st.integers(2, 12),
)
def test_invariants_hold_and_hits_never_exceed_an_unbounded_pool(
    steps: list[tuple[int, int, bool]], num_blocks: int
) -> None:
    """A bounded pool hits at most what an unbounded one does, request by request."""
    small = BlockPool(num_blocks, B)
    large = BlockPool(10_000, B)
    histories: list[list[int]] = [[c * 1000] for c in range(4)]
    for c, grow, keep in steps:
        histories[c] += tokens(c * 1000 + len(histories[c]), grow)
        prompt = histories[c]
        answer = tokens(c * 1000 + 500 + len(prompt), 3) if keep else None
        got_small, got_large = serve(small, prompt, answer), serve(large, prompt, answer)
        assert got_small <= got_large
        assert got_small % B == 0 and got_small <= len(prompt) - 1
        if keep and answer is not None:
            histories[c] = prompt + answer
