"""RadixTrie: insert/match/split, locks, inspection, eviction, expiry, maintenance."""

from __future__ import annotations

import tracemalloc
from array import array

import pytest

from kvern.trie import (
    EvictedPrefix,
    HotPrefix,
    LRUPolicy,
    RadixTrie,
    TrieNode,
    make_policy,
)
from kvern.trie.invariants import check_trie
from kvern.trie.report import hot_prefixes, measure


def make_trie(*sequences: list[int], policy: LRUPolicy | None = None) -> RadixTrie:
    """A trie holding ``sequences``, inserted at t = 1, 2, 3... with invariants checked."""
    trie = RadixTrie(policy)
    for at_s, tokens in enumerate(sequences, start=1):
        trie.insert(tokens, float(at_s))
        check_trie(trie)
    return trie


def edges(trie: RadixTrie) -> dict[tuple[int, ...], list[int]]:
    """Full path of every node -> its edge tokens, to assert a tree's exact shape."""
    shape: dict[tuple[int, ...], list[int]] = {}
    stack = list(trie.root.children.values())
    while stack:
        node = stack.pop()
        shape[tuple(trie.prefix_tokens(node))] = node.key.tolist()
        stack.extend(node.children.values())
    return shape


# ------------------------------------------------------------------ insert/match


def test_insert_into_empty_trie_adds_one_leaf() -> None:
    trie = RadixTrie()
    result = trie.insert([1, 2, 3], 1.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (0, 3)
    assert result.node.key.tolist() == [1, 2, 3]
    assert result.node.depth == 3
    assert result.node.hit_count == 1
    assert result.node.first_seen_s == result.node.last_access_s == 1.0
    assert (trie.num_tokens, trie.num_nodes) == (3, 1)


def test_insert_empty_sequence_is_a_noop_returning_root() -> None:
    trie = make_trie([1, 2])
    result = trie.insert([], 5.0)
    check_trie(trie)
    assert result.node is trie.root
    assert (result.matched_tokens, result.new_tokens) == (0, 0)
    assert trie.root.hit_count == 1
    assert trie.root.last_access_s == 1.0


def test_reinsert_same_sequence_matches_all_and_adds_nothing() -> None:
    trie = make_trie([1, 2, 3])
    first = trie.match([1, 2, 3]).node
    result = trie.insert([1, 2, 3], 2.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (3, 0)
    assert result.node is first
    assert first.hit_count == 2
    assert first.last_access_s == 2.0
    assert first.first_seen_s == 1.0


def test_extension_appends_a_child_leaf() -> None:
    trie = make_trie([1, 2, 3])
    result = trie.insert([1, 2, 3, 4, 5], 2.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (3, 2)
    assert edges(trie) == {(1, 2, 3): [1, 2, 3], (1, 2, 3, 4, 5): [4, 5]}
    assert result.node.parent is trie.match([1, 2, 3]).node


def test_partial_match_splits_node_and_keeps_counts() -> None:
    trie = make_trie([1, 2, 3, 4, 5])
    trie.insert([1, 2, 3, 4, 5], 2.0)  # the original node now has 2 hits
    original = trie.match([1, 2, 3, 4, 5]).node
    result = trie.insert([1, 2, 3, 9, 9], 3.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (3, 2)
    assert edges(trie) == {(1, 2, 3): [1, 2, 3], (1, 2, 3, 4, 5): [4, 5], (1, 2, 3, 9, 9): [9, 9]}
    upper = original.parent
    assert upper is not None and upper.parent is trie.root
    # The lower half is the same object with its own stats untouched.
    assert original.key.tolist() == [4, 5]
    assert (original.hit_count, original.last_access_s, original.depth) == (2, 2.0, 5)
    # The upper half copied them and then counted this request.
    assert (upper.hit_count, upper.first_seen_s, upper.last_access_s) == (3, 1.0, 3.0)
    assert upper.depth == 3
    assert result.node.hit_count == 1 and result.node.first_seen_s == 3.0
    assert (trie.num_tokens, trie.num_nodes) == (7, 3)


def test_insert_ending_inside_an_edge_splits_and_returns_upper_node() -> None:
    trie = make_trie([1, 2, 3, 4, 5])
    result = trie.insert([1, 2], 2.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (2, 0)
    assert result.node.key.tolist() == [1, 2]
    assert result.node.depth == 2
    assert result.node.hit_count == 2
    assert edges(trie) == {(1, 2): [1, 2], (1, 2, 3, 4, 5): [3, 4, 5]}


def test_divergence_at_first_token_adds_sibling_under_root() -> None:
    trie = make_trie([1, 2, 3])
    result = trie.insert([7, 2, 3], 2.0)
    check_trie(trie)
    assert (result.matched_tokens, result.new_tokens) == (0, 3)
    assert sorted(trie.root.children) == [1, 7]
    assert trie.root.hit_count == 2


def test_split_copies_lock_ref_score_and_upstreams() -> None:
    trie = make_trie([1, 2, 3, 4])
    lower = trie.match([1, 2, 3, 4]).node
    lower.upstreams = {"gpu-a": 1.0}
    lower.score = 4.5
    trie.lock(lower)
    trie.insert([1, 2, 9], 2.0)
    check_trie(trie)
    upper = lower.parent
    assert upper is not None and upper is not trie.root
    assert upper.lock_ref == 1
    assert upper.score == 4.5
    assert upper.upstreams == {"gpu-a": 1.0}
    assert upper.upstreams is not lower.upstreams  # a copy, not shared
    assert lower.upstreams == {"gpu-a": 1.0}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ([], 0),
        ([9], 0),
        ([1], 1),
        ([1, 2, 3], 3),
        ([1, 2, 3, 4], 4),
        ([1, 2, 3, 4, 5, 6], 6),
        ([1, 2, 3, 4, 5, 6, 7, 8], 6),
        ([1, 2, 3, 8], 4),
        ([1, 2, 3, 8, 8, 0], 5),
        ([1, 2, 7], 2),
    ],
)
def test_match_returns_longest_common_prefix(query: list[int], expected: int) -> None:
    trie = make_trie([1, 2, 3, 4, 5, 6], [1, 2, 3, 8, 8])
    assert trie.match(query).matched_tokens == expected


def test_match_is_read_only() -> None:
    trie = make_trie([1, 2, 3, 4], [1, 2, 9])
    before = edges(trie)
    hits = [n.hit_count for n in (trie.root, *trie.root.children.values())]
    result = trie.match([1, 2, 3])  # ends inside an edge: no split
    check_trie(trie)
    assert result.matched_tokens == 3
    assert result.node.key.tolist() == [3, 4]  # the partially matched node
    assert edges(trie) == before
    assert [n.hit_count for n in (trie.root, *trie.root.children.values())] == hits
    assert trie.num_nodes == 3


def test_match_of_nothing_returns_root() -> None:
    trie = make_trie([1, 2])
    result = trie.match([5, 6])
    assert result.node is trie.root and result.matched_tokens == 0


def test_match_accepts_list_tuple_and_int_array_alike() -> None:
    trie = make_trie([1, 2, 3])
    assert trie.match((1, 2, 9)).matched_tokens == 2
    assert trie.match(array("i", [1, 2, 3])).matched_tokens == 3
    assert trie.match(array("l", [1, 2, 3])).matched_tokens == 3


def test_insert_does_not_alias_a_callers_int_array() -> None:
    tokens = array("i", [1, 2, 3])
    trie = RadixTrie()
    trie.insert(tokens, 1.0)
    tokens[0] = 99
    assert trie.match([1, 2, 3]).matched_tokens == 3


def test_long_edges_split_at_exact_divergence_point() -> None:
    base = list(range(1000, 3000))
    trie = make_trie(base)
    for cut in (1, 2, 17, 1023, 1999):
        other = base[:cut] + [-1]
        assert trie.match(other).matched_tokens == cut
    result = trie.insert(base[:1234] + [7, 7], 2.0)
    check_trie(trie)
    assert result.matched_tokens == 1234
    assert trie.match(base).matched_tokens == 2000


def test_every_node_on_path_counts_the_request() -> None:
    trie = make_trie([1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6])
    leaf = trie.match([1, 2, 3, 4, 5, 6]).node
    path = [leaf, leaf.parent, leaf.parent.parent if leaf.parent else None]
    assert [n.hit_count for n in path if n] == [1, 2, 3]
    assert [n.last_access_s for n in path if n] == [3.0, 3.0, 3.0]
    assert trie.root.hit_count == 3


def test_clock_going_backwards_is_clamped_to_latest_seen() -> None:
    trie = make_trie([1, 2, 3])
    trie.insert([1, 2, 3], 10.0)
    result = trie.insert([1, 5], 4.0)
    check_trie(trie)
    assert result.node.first_seen_s == 10.0
    assert result.node.parent is not None and result.node.parent.last_access_s == 10.0


# -------------------------------------------------------------------- aligned


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [(0, 16, 0), (15, 16, 0), (16, 16, 16), (47, 16, 32), (47, 1, 47), (100, 7, 98)],
)
def test_aligned_floors_to_block_multiple(num_tokens: int, block_size: int, expected: int) -> None:
    assert RadixTrie.aligned(num_tokens, block_size) == expected


def test_aligned_rejects_block_size_below_one() -> None:
    with pytest.raises(ValueError, match="block_size"):
        RadixTrie.aligned(10, 0)


# ---------------------------------------------------------------------- locks


def test_lock_pins_path_up_to_and_including_root() -> None:
    trie = make_trie([1, 2], [1, 2, 3, 4])
    leaf = trie.match([1, 2, 3, 4]).node
    trie.lock(leaf)
    check_trie(trie)
    assert leaf.lock_ref == 1
    assert leaf.parent is not None and leaf.parent.lock_ref == 1
    assert trie.root.lock_ref == 1
    trie.unlock(leaf)
    check_trie(trie)
    assert leaf.lock_ref == leaf.parent.lock_ref == trie.root.lock_ref == 0


def test_unlock_below_zero_is_an_assertion_error() -> None:
    trie = make_trie([1, 2])
    node = trie.match([1, 2]).node
    with pytest.raises(AssertionError, match="lock_ref=0"):
        trie.unlock(node)
    check_trie(trie)


def test_lock_of_evicted_node_is_refused() -> None:
    trie = make_trie([1, 2])
    node = trie.match([1, 2]).node
    trie.evict(0, 2.0)
    with pytest.raises(ValueError, match="no longer in the trie"):
        trie.lock(node)


def test_locked_nodes_survive_eviction() -> None:
    trie = make_trie([1, 2, 3], [4, 5, 6], [7, 8, 9])
    locked = trie.match([1, 2, 3]).node  # the oldest: LRU would evict it first
    trie.lock(locked)
    evicted = trie.evict(0, 4.0)
    check_trie(trie)
    assert evicted == [EvictedPrefix([4, 5, 6], 3), EvictedPrefix([7, 8, 9], 3)]
    assert trie.num_tokens == 3
    assert trie.match([1, 2, 3]).matched_tokens == 3
    trie.unlock(locked)
    assert trie.evict(0, 5.0) == [EvictedPrefix([1, 2, 3], 3)]
    check_trie(trie)


def test_lock_on_a_node_protects_its_ancestors_when_siblings_go() -> None:
    trie = make_trie([1, 2, 3], [1, 2, 4])
    locked = trie.match([1, 2, 4]).node
    trie.lock(locked)
    evicted = trie.evict(0, 3.0)
    check_trie(trie)
    assert evicted == [EvictedPrefix([1, 2, 3], 1)]
    assert edges(trie) == {(1, 2): [1, 2], (1, 2, 4): [4]}


# ----------------------------------------------------------------- inspection


def test_prefix_tokens_rebuilds_the_full_path() -> None:
    trie = make_trie([1, 2, 3, 4], [1, 2, 5])
    assert trie.prefix_tokens(trie.match([1, 2, 3, 4]).node) == [1, 2, 3, 4]
    assert trie.prefix_tokens(trie.match([1, 2]).node) == [1, 2]
    assert trie.prefix_tokens(trie.root) == []


def test_hot_prefixes_orders_by_hits_then_depth_and_prefers_longest() -> None:
    trie = RadixTrie()
    for at_s in (1.0, 2.0, 3.0):
        trie.insert([1, 2, 3, 4, 5, 6], at_s)  # one 6-token node, 3 hits
    trie.insert([1, 2, 3, 7], 4.0)  # splits it: [1,2,3] has 4 hits
    trie.insert([8, 9], 5.0)
    trie.insert([8, 9, 10], 6.0)  # [8,9] 2 hits; [8,9,10] 1
    check_trie(trie)
    assert hot_prefixes(trie, 10) == [
        HotPrefix([1, 2, 3], 3, 4, 1.0, 4.0),
        HotPrefix([1, 2, 3, 4, 5, 6], 6, 3, 1.0, 3.0),
        HotPrefix([8, 9], 2, 2, 5.0, 6.0),
        HotPrefix([1, 2, 3, 7], 4, 1, 4.0, 4.0),
        HotPrefix([8, 9, 10], 3, 1, 6.0, 6.0),
    ]
    assert [h.tokens for h in hot_prefixes(trie, 2)] == [[1, 2, 3], [1, 2, 3, 4, 5, 6]]
    assert [h.tokens for h in hot_prefixes(trie, 10, min_depth=4)] == [
        [1, 2, 3, 4, 5, 6],
        [1, 2, 3, 7],
    ]


def test_hot_prefixes_skips_node_whose_child_is_equally_hot() -> None:
    # Inserts alone leave a parent strictly hotter than its child (the request
    # that split it counted on the parent only), so after evicting the sibling
    # set the child's count by hand, as a restored snapshot could leave it.
    trie = make_trie([1, 2, 3, 9], [1, 2, 3, 4, 5])
    assert trie.evict(5, 3.0) == [EvictedPrefix([1, 2, 3, 9], 1)]
    upper = trie.match([1, 2, 3]).node
    longer = trie.match([1, 2, 3, 4, 5]).node
    longer.hit_count = upper.hit_count
    check_trie(trie)
    assert [(h.tokens, h.hit_count) for h in hot_prefixes(trie, 10)] == [([1, 2, 3, 4, 5], 2)]


def test_hot_prefixes_on_empty_trie_is_empty() -> None:
    assert hot_prefixes(RadixTrie(), 5) == []


def test_stats_counts_nodes_tokens_and_estimates_bytes() -> None:
    empty = measure(RadixTrie())
    assert (empty.num_nodes, empty.num_tokens) == (0, 0)
    assert empty.estimated_bytes > 0  # the root
    trie = make_trie([1, 2, 3, 4], [1, 2, 500, 600])
    stats = measure(trie)
    assert (stats.num_nodes, stats.num_tokens) == (3, 6)
    assert (trie.num_nodes, trie.num_tokens) == (3, 6)
    assert stats.estimated_bytes > empty.estimated_bytes + 3 * 100
    bigger = measure(make_trie([1, 2, 3, 4], [1, 2, 500, 600] + list(range(1000, 2000))))
    assert bigger.estimated_bytes >= stats.estimated_bytes + 4000  # 4 bytes a token


def test_stats_counts_upstreams_dicts() -> None:
    trie = make_trie([1, 2])
    before = measure(trie).estimated_bytes
    trie.match([1, 2]).node.upstreams = {"a": 1.0, "b": 2.0}
    assert measure(trie).estimated_bytes > before


# ------------------------------------------------------------------- eviction


def test_evict_does_nothing_under_budget() -> None:
    trie = make_trie([1, 2, 3])
    assert trie.evict(3, 5.0) == []
    assert trie.num_tokens == 3


def test_evict_removes_lru_leaves_until_under_budget() -> None:
    trie = make_trie([1, 2, 3], [4, 5], [6, 7, 8, 9])
    evicted = trie.evict(5, 10.0)
    check_trie(trie)
    assert evicted == [EvictedPrefix([1, 2, 3], 3), EvictedPrefix([4, 5], 2)]
    assert trie.num_tokens == 4 and trie.num_nodes == 1


def test_evict_pushes_parent_that_becomes_a_leaf() -> None:
    trie = make_trie([1, 2, 3, 4], [1, 2, 5], [9])
    trie.insert([9], 10.0)  # [9] is now the most recent
    evicted = trie.evict(1, 11.0)
    check_trie(trie)
    assert evicted == [
        EvictedPrefix([1, 2, 3, 4], 2),
        EvictedPrefix([1, 2, 5], 1),
        EvictedPrefix([1, 2], 2),
    ]
    assert edges(trie) == {(9,): [9]}


def test_evict_stops_when_everything_left_is_locked() -> None:
    trie = make_trie([1, 2, 3], [4, 5, 6])
    trie.lock(trie.match([1, 2, 3]).node)
    trie.lock(trie.match([4, 5, 6]).node)
    assert trie.evict(0, 5.0) == []
    check_trie(trie)
    assert trie.num_tokens == 6


def test_evict_to_zero_empties_the_trie() -> None:
    trie = make_trie([1, 2, 3], [1, 2, 4], [5])
    trie.evict(0, 10.0)
    check_trie(trie)
    assert (trie.num_tokens, trie.num_nodes, trie.root.children) == (0, 0, {})
    assert trie.match([1, 2, 3]).matched_tokens == 0
    result = trie.insert([1, 2, 3], 11.0)
    check_trie(trie)
    assert result.matched_tokens == 0


def test_evicted_node_is_detached() -> None:
    trie = make_trie([1, 2])
    node: TrieNode = trie.match([1, 2]).node
    trie.evict(0, 2.0)
    assert node.parent is None


# --------------------------------------------------------------------- expiry


def test_expire_without_ttl_removes_nothing() -> None:
    trie = make_trie([1, 2, 3])
    assert trie.expire(1e9) == []


def test_expire_removes_idle_leaves_and_then_idle_parents() -> None:
    trie = RadixTrie(make_policy("ttl", ttl_s=10.0))
    trie.insert([1, 2, 3], 0.0)
    trie.insert([1, 2, 4], 1.0)
    trie.insert([7], 2.0)
    trie.insert([1, 5], 8.0)  # keeps [1] fresh; [2] below it goes once its leaves go
    check_trie(trie)
    evicted = trie.expire(15.0)  # cutoff 5.0
    check_trie(trie)
    assert evicted == [
        EvictedPrefix([1, 2, 3], 1),
        EvictedPrefix([1, 2, 4], 1),
        EvictedPrefix([1, 2], 1),
        EvictedPrefix([7], 1),
    ]
    assert edges(trie) == {(1,): [1], (1, 5): [5]}


def test_expire_keeps_locked_paths_even_when_idle() -> None:
    trie = RadixTrie(make_policy("ttl", ttl_s=10.0))
    trie.insert([1, 2, 3], 0.0)
    trie.insert([1, 2, 4], 0.0)
    trie.lock(trie.match([1, 2, 4]).node)
    evicted = trie.expire(100.0)
    check_trie(trie)
    assert evicted == [EvictedPrefix([1, 2, 3], 1)]
    assert trie.match([1, 2, 4]).matched_tokens == 3


def test_expire_keeps_leaves_accessed_exactly_at_cutoff() -> None:
    trie = RadixTrie(make_policy("lru", ttl_s=10.0))
    trie.insert([1], 5.0)
    trie.insert([2], 4.0)  # clamped to 5.0 (the clock never goes back)
    assert trie.expire(15.0) == []
    assert [e.tokens for e in trie.expire(15.5)] == [[1], [2]]
    check_trie(trie)


# ---------------------------------------------------------------- maintenance


def test_maintain_evicts_down_to_low_watermark() -> None:
    trie = RadixTrie()
    for i in range(10):
        trie.insert([100 + i] * 10, float(i))  # ten 10-token leaves
    removed = trie.maintain(95, 10.0, low_watermark=0.5)
    check_trie(trie)
    assert removed == 60  # down to 40 <= int(95 * 0.5)
    assert trie.num_tokens == 40
    assert trie.match([109] * 10).matched_tokens == 10  # newest kept
    assert trie.match([100] * 10).matched_tokens == 0


def test_maintain_does_nothing_within_budget() -> None:
    trie = make_trie([1, 2, 3])
    assert trie.maintain(3, 10.0) == 0
    assert trie.num_tokens == 3


def test_maintain_rejects_bad_low_watermark() -> None:
    trie = RadixTrie()
    with pytest.raises(ValueError, match="low_watermark"):
        trie.maintain(10, 0.0, low_watermark=0.0)
    with pytest.raises(ValueError, match="low_watermark"):
        trie.maintain(10, 0.0, low_watermark=1.5)


def test_maintain_expires_at_most_once_per_tenth_of_ttl() -> None:
    trie = RadixTrie(make_policy("lru", ttl_s=100.0))
    trie.insert([1], 0.0)
    assert trie.maintain(1000, 50.0) == 0  # ran expire: nothing idle yet; next at 60
    trie.insert([2], 60.0)
    assert trie.maintain(1000, 101.0) == 1  # [1] idle since 0 < 1; next run at 111
    check_trie(trie)
    assert trie.maintain(1000, 151.0) == 0  # runs: [2] seen at 60 >= 51; next at 161
    assert trie.maintain(1000, 160.5) == 0  # throttled, though [2] is idle by now
    assert trie.num_tokens == 1
    assert trie.maintain(1000, 161.0) == 1  # runs: [2] seen at 60 < 61
    check_trie(trie)
    assert trie.num_tokens == 0


def test_maintain_allocates_for_the_leaves_it_removes_not_for_their_depth() -> None:
    # 200 conversations sharing a 20,000-token prefix, each ending in its own
    # 10-token turn. maintain() must only count what it removes; spelling out
    # each removed leaf's whole path (20,010 ints apiece, ~80 MB here) was a
    # transient that rose with conversation depth and left the tracking
    # process larger after every eviction.
    shared = list(range(1000, 21_000))
    trie = RadixTrie()
    for i in range(200):
        trie.insert(shared + [50_000 + i] * 10, float(i))
    budget = len(shared) + 1000  # keep 100 of the 200 tails: 100 leaves go
    tracemalloc.start()
    try:
        removed = trie.maintain(budget, 300.0, low_watermark=1.0)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    check_trie(trie)
    assert removed == 1000 and trie.num_tokens == budget
    assert peak_bytes < 1_000_000, peak_bytes


def test_uncounted_insert_touches_but_counts_no_hit() -> None:
    trie = RadixTrie()
    prompt = trie.insert([1, 2, 3, 4], now_s=1.0).node
    answer = trie.insert([1, 2, 3, 4, 9, 9], now_s=2.0, count_hit=False)
    check_trie(trie)
    assert answer.matched_tokens == 4 and answer.new_tokens == 2
    assert (prompt.hit_count, answer.node.hit_count) == (1, 0)
    assert prompt.last_access_s == 2.0
    # Splitting an existing path for another uncounted branch keeps the counts consistent.
    trie.insert([1, 2, 7], now_s=3.0, count_hit=False)
    check_trie(trie)
    assert [h.hit_count for h in hot_prefixes(trie, 5)] == [1]
