"""Eviction policies: exact eviction orders on hand-built scenarios, TTL, registry."""

from __future__ import annotations

import pytest

from kvern.trie import (
    POLICIES,
    CostAwarePolicy,
    EvictedPrefix,
    EvictionPolicy,
    LFUDecayPolicy,
    LRUPolicy,
    RadixTrie,
    TTLPolicy,
    make_policy,
)

# A 47-token shared system prompt and a 4-token one-off, with disjoint ids.
SYSTEM_PROMPT = list(range(1000, 1047))
ONE_OFF = [7, 8, 9, 10]


def run(start: int, num_tokens: int) -> list[int]:
    """``num_tokens`` consecutive token ids from ``start``."""
    return list(range(start, start + num_tokens))


def hit(trie: RadixTrie, tokens: list[int], *times_s: float) -> None:
    """Insert ``tokens`` once at each of ``times_s``, checking invariants."""
    for now_s in times_s:
        trie.insert(tokens, now_s)
        trie.check_invariants()


def evict_all(trie: RadixTrie, now_s: float) -> list[list[int]]:
    """Evict everything; the evicted prefixes in order."""
    evicted = trie.evict(0, now_s)
    trie.check_invariants()
    assert trie.num_tokens == 0
    return [e.tokens for e in evicted]


def seed_scenario(policy: EvictionPolicy) -> RadixTrie:
    """The shared system prompt hit 20 times long ago; a one-off touched recently."""
    trie = RadixTrie(policy)
    hit(trie, SYSTEM_PROMPT, *(float(t) for t in range(20)))
    hit(trie, ONE_OFF, 1000.0)
    return trie


# ----------------------------------------------------------- the seed scenario


def test_lru_evicts_deep_hot_system_prompt_before_recent_one_off() -> None:
    trie = seed_scenario(make_policy("lru"))
    assert evict_all(trie, 1000.0) == [SYSTEM_PROMPT, ONE_OFF]


def test_cost_aware_keeps_deep_hot_system_prompt_over_recent_one_off() -> None:
    trie = seed_scenario(make_policy("cost_aware"))
    assert evict_all(trie, 1000.0) == [ONE_OFF, SYSTEM_PROMPT]


def test_cost_aware_frees_budget_from_the_one_off_first() -> None:
    trie = seed_scenario(make_policy("cost_aware"))
    assert trie.evict(47, 1000.0) == [EvictedPrefix(ONE_OFF, 4)]
    trie.check_invariants()
    assert trie.match(SYSTEM_PROMPT).matched_tokens == 47


def test_lfu_keeps_deep_hot_system_prompt_over_recent_one_off() -> None:
    trie = seed_scenario(make_policy("lfu"))
    assert evict_all(trie, 1000.0) == [ONE_OFF, SYSTEM_PROMPT]


def test_cost_aware_weighs_tokens_where_lfu_only_counts_hits() -> None:
    # The deep node's 2 hits have decayed to ~1 by now; the shallow node has 3
    # fresh hits. LFU keeps the shallow node; cost-aware keeps 47 tokens of
    # prefill over 4.
    def build(policy: EvictionPolicy) -> RadixTrie:
        trie = RadixTrie(policy)
        hit(trie, SYSTEM_PROMPT, 0.0, 0.0)
        hit(trie, ONE_OFF, 600.0, 601.0, 602.0)
        return trie

    assert evict_all(build(make_policy("lru")), 602.0) == [SYSTEM_PROMPT, ONE_OFF]
    assert evict_all(build(make_policy("lfu")), 602.0) == [SYSTEM_PROMPT, ONE_OFF]
    assert evict_all(build(make_policy("cost_aware")), 602.0) == [ONE_OFF, SYSTEM_PROMPT]


# -------------------------------------------------------------------------- lru


def test_lru_evicts_least_recent_first_and_parents_in_turn() -> None:
    shared = run(100, 20)
    b, c, a = shared + run(200, 10), shared + run(300, 10), run(400, 10)
    trie = RadixTrie(make_policy("lru"))
    hit(trie, b, 0.0)
    hit(trie, c, 1.0)
    hit(trie, a, 2.0)
    assert evict_all(trie, 3.0) == [b, c, shared, a]


def test_lru_breaks_ties_by_depth_then_insertion_order() -> None:
    trie = RadixTrie(make_policy("lru"))
    hit(trie, run(100, 5), 1.0)
    hit(trie, run(200, 2), 1.0)
    hit(trie, run(300, 2), 1.0)
    assert evict_all(trie, 2.0) == [run(200, 2), run(300, 2), run(100, 5)]


# -------------------------------------------------------------------------- lfu


def test_lfu_evicts_least_frequent_first() -> None:
    frequent, rare = run(100, 5), run(200, 5)
    trie = RadixTrie(make_policy("lfu"))
    hit(trie, frequent, 0.0, 1.0, 2.0, 3.0, 4.0)
    hit(trie, rare, 10.0)
    assert evict_all(trie, 10.0) == [rare, frequent]


def test_lfu_decay_lets_old_bursts_fade() -> None:
    old_burst, recent = run(100, 5), run(200, 5)
    trie = RadixTrie(make_policy("lfu", half_life_s=600.0))
    hit(trie, old_burst, *([0.0] * 10))  # 10 hits, 5 half-lives ago: worth 0.31
    hit(trie, recent, 3000.0, 3000.0)  # worth 2
    assert evict_all(trie, 3000.0) == [old_burst, recent]


def test_lfu_score_is_a_decayed_running_hit_count() -> None:
    policy = LFUDecayPolicy(half_life_s=600.0)
    trie = RadixTrie(policy)
    hit(trie, [1, 2, 3], 0.0, 600.0)
    node = trie.match([1, 2, 3]).node
    assert node.score == pytest.approx(1.5)  # 1 * 0.5 + 1
    assert node.score_time_s == 600.0
    assert policy.sort_key(node, 1200.0) == pytest.approx((0.75, 600.0, 3))
    hit(trie, [1, 2, 3], 1200.0)
    assert node.score == pytest.approx(1.75)


def test_lfu_counts_same_instant_hits_without_decay() -> None:
    trie = RadixTrie(make_policy("lfu"))
    hit(trie, [1, 2], 5.0, 5.0, 5.0)
    assert trie.match([1, 2]).node.score == pytest.approx(3.0)


def test_lfu_split_node_inherits_score_then_counts_the_request() -> None:
    trie = RadixTrie(make_policy("lfu", half_life_s=10.0))
    hit(trie, [1, 2, 3, 4], 0.0, 0.0)
    hit(trie, [1, 2, 9], 10.0)
    upper = trie.match([1, 2]).node
    lower = trie.match([1, 2, 3, 4]).node
    assert upper.score == pytest.approx(2.0)  # 2 * 0.5 + 1
    assert lower.score == pytest.approx(2.0)  # untouched since t=0
    assert lower.score_time_s == 0.0


# ------------------------------------------------------------------- cost_aware


def test_cost_aware_recompute_cost_formula() -> None:
    policy = CostAwarePolicy(attention_tokens=4096)
    trie = RadixTrie(policy)
    hit(trie, SYSTEM_PROMPT, 0.0)
    hit(trie, SYSTEM_PROMPT + run(5000, 10), 0.0)
    prompt = trie.match(SYSTEM_PROMPT).node
    turn = trie.match(SYSTEM_PROMPT + run(5000, 10)).node
    assert policy.recompute_cost(prompt) == pytest.approx(47 * (1 + 23.5 / 4096))
    assert policy.recompute_cost(turn) == pytest.approx(10 * (1 + 52 / 4096))
    assert policy.sort_key(turn, 0.0) == pytest.approx((1 * 10 * (1 + 52 / 4096), 0.0, 57))


def test_cost_aware_keeps_deeper_edges_longer_at_equal_size_and_hits() -> None:
    # Same hits, same edge size: the deeper edge attends to more context, so it
    # costs more to prefill again. LRU, blind to depth, goes by recency.
    shared = run(100, 20)
    b, c, a = shared + run(200, 10), shared + run(300, 10), run(400, 10)

    def build(policy: EvictionPolicy) -> RadixTrie:
        trie = RadixTrie(policy)
        hit(trie, b, 0.0)
        hit(trie, c, 1.0)
        hit(trie, a, 2.0)
        return trie

    assert evict_all(build(make_policy("lru")), 3.0) == [b, c, shared, a]
    cost_aware = make_policy("cost_aware", attention_tokens=10)
    assert evict_all(build(cost_aware), 3.0) == [a, b, c, shared]


def test_cost_aware_decay_lets_an_idle_deep_node_go_eventually() -> None:
    trie = RadixTrie(make_policy("cost_aware", half_life_s=60.0))
    hit(trie, SYSTEM_PROMPT, 0.0, 1.0, 2.0)  # worth ~3 * 47 at t=2
    hit(trie, ONE_OFF, 1200.0, 1200.0)  # 20 half-lives later: the prompt is worth ~0
    assert evict_all(trie, 1200.0) == [SYSTEM_PROMPT, ONE_OFF]


# -------------------------------------------------------------------------- ttl


def test_ttl_policy_expires_idle_leaves_regardless_of_capacity() -> None:
    trie = RadixTrie(make_policy("ttl", ttl_s=100.0))
    hit(trie, run(100, 3), 0.0)
    hit(trie, run(200, 3), 50.0)
    hit(trie, run(300, 3), 100.0)
    assert trie.evict(1_000_000, 160.0) == []  # plenty of room
    evicted = trie.expire(160.0)  # cutoff 60
    trie.check_invariants()
    assert evicted == [EvictedPrefix(run(100, 3), 3), EvictedPrefix(run(200, 3), 3)]
    assert trie.num_tokens == 3


def test_ttl_policy_orders_eviction_like_lru() -> None:
    trie = RadixTrie(make_policy("ttl", ttl_s=1e9))
    hit(trie, run(100, 9), 0.0)
    hit(trie, run(200, 1), 1.0)
    assert evict_all(trie, 2.0) == [run(100, 9), run(200, 1)]


def test_lru_with_ttl_expires_and_still_evicts_by_recency() -> None:
    trie = RadixTrie(make_policy("lru", ttl_s=100.0))
    hit(trie, run(100, 3), 0.0)
    hit(trie, run(200, 3), 150.0)
    hit(trie, run(300, 3), 160.0)
    assert [e.tokens for e in trie.expire(170.0)] == [run(100, 3)]
    trie.check_invariants()
    assert [e.tokens for e in trie.evict(3, 170.0)] == [run(200, 3)]
    trie.check_invariants()


def test_cost_aware_with_ttl_expires_even_the_valuable_deep_node() -> None:
    trie = seed_scenario(make_policy("cost_aware", ttl_s=300.0))
    assert trie.expire(1000.0) == [EvictedPrefix(SYSTEM_PROMPT, 47)]
    trie.check_invariants()
    assert trie.match(ONE_OFF).matched_tokens == 4


def test_expire_removes_in_policy_order() -> None:
    # Both expired: LRU removes the older first, cost-aware the cheaper first.
    def build(policy: EvictionPolicy) -> RadixTrie:
        trie = RadixTrie(policy)
        hit(trie, SYSTEM_PROMPT, 0.0, 1.0, 2.0)
        hit(trie, ONE_OFF, 10.0)
        hit(trie, run(5000, 2), 500.0)
        return trie

    lru = build(make_policy("lru", ttl_s=100.0)).expire(500.0)
    assert [e.tokens for e in lru] == [SYSTEM_PROMPT, ONE_OFF]
    cost_aware = build(make_policy("cost_aware", ttl_s=100.0)).expire(500.0)
    assert [e.tokens for e in cost_aware] == [ONE_OFF, SYSTEM_PROMPT]


def test_maintain_with_cost_aware_ttl_expires_then_evicts() -> None:
    trie = RadixTrie(make_policy("cost_aware", ttl_s=100.0))
    hit(trie, run(100, 10), 0.0)  # idle: expires
    hit(trie, SYSTEM_PROMPT, 150.0, 151.0)  # valuable: kept
    hit(trie, ONE_OFF, 152.0)  # cheap: evicted to make room
    removed = trie.maintain(50, 152.0, low_watermark=1.0)
    trie.check_invariants()
    assert removed == 14
    assert trie.match(SYSTEM_PROMPT).matched_tokens == 47
    assert trie.num_tokens == 47


# --------------------------------------------------------------------- registry


def test_registry_names_every_policy() -> None:
    assert set(POLICIES) == {"lru", "lfu", "cost_aware", "ttl"}
    for name in POLICIES:
        params = {"ttl_s": 60.0} if name == "ttl" else {}
        assert make_policy(name, **params).name == name


def test_make_policy_passes_parameters() -> None:
    policy = make_policy("cost_aware", half_life_s=30.0, attention_tokens=1024, ttl_s=5.0)
    assert policy == CostAwarePolicy(half_life_s=30.0, attention_tokens=1024, ttl_s=5.0)
    assert policy.ttl_s == 5.0
    assert make_policy("lfu", half_life_s=10.0) == LFUDecayPolicy(half_life_s=10.0)
    assert make_policy("ttl", ttl_s=9.0) == TTLPolicy(ttl_s=9.0)


def test_default_policy_is_lru_without_ttl() -> None:
    assert RadixTrie().policy == LRUPolicy()
    assert RadixTrie().policy.ttl_s is None


def test_unknown_policy_name_is_a_value_error_listing_choices() -> None:
    with pytest.raises(ValueError) as info:
        make_policy("lfru")
    assert str(info.value) == (
        "unknown eviction policy 'lfru'; expected one of cost_aware, lfu, lru, ttl"
    )


def test_ttl_policy_requires_positive_ttl() -> None:
    with pytest.raises(ValueError, match=r"policy 'ttl' needs ttl_s > 0"):
        make_policy("ttl")
    with pytest.raises(ValueError, match=r"policy 'ttl' needs ttl_s > 0"):
        make_policy("ttl", ttl_s=0.0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("lru", {"ttl_s": -1.0}, r"policy 'lru' needs ttl_s > 0"),
        ("lfu", {"half_life_s": 0.0}, r"policy 'lfu' needs half_life_s > 0"),
        ("cost_aware", {"half_life_s": -5.0}, r"policy 'cost_aware' needs half_life_s > 0"),
        ("cost_aware", {"attention_tokens": 0}, r"policy 'cost_aware' needs attention_tokens"),
        ("cost_aware", {"ttl_s": 0.0}, r"policy 'cost_aware' needs ttl_s > 0"),
    ],
)
def test_out_of_range_parameter_is_a_value_error_naming_it(
    name: str, params: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)


def test_unknown_parameter_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"policy 'lru' got unknown parameter 'half_life_s'"):
        make_policy("lru", half_life_s=60.0)
    with pytest.raises(ValueError, match=r"unknown parameter 'name'"):
        make_policy("lfu", name="lru")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sort_keys_end_with_last_access_then_depth(name: str) -> None:
    policy = make_policy(name, ttl_s=60.0)
    trie = RadixTrie(policy)
    hit(trie, [1, 2, 3], 7.0)
    node = trie.match([1, 2, 3]).node
    assert policy.sort_key(node, 8.0)[-2:] == (7.0, 3)
