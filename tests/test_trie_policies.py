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
from kvern.trie.invariants import check_trie

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
        check_trie(trie)


def evict_all(trie: RadixTrie, now_s: float) -> list[list[int]]:
    """Evict everything; the evicted prefixes in order."""
    evicted = trie.evict(0, now_s)
    check_trie(trie)
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
    # No eviction yet, so the clock is 0 for both. The prompt ended 20
    # requests, decayed (half-life 600 s) to 6.37 by t=1000: H = 6.37 x 1.0057.
    # The one-off ended one fresh request: H = 1 x 1.0005.
    trie = seed_scenario(make_policy("cost_aware"))
    assert evict_all(trie, 1000.0) == [ONE_OFF, SYSTEM_PROMPT]


def test_cost_aware_frees_budget_from_the_one_off_first() -> None:
    trie = seed_scenario(make_policy("cost_aware"))
    assert trie.evict(47, 1000.0) == [EvictedPrefix(ONE_OFF, 4)]
    check_trie(trie)
    assert trie.match(SYSTEM_PROMPT).matched_tokens == 47


def test_lfu_keeps_deep_hot_system_prompt_over_recent_one_off() -> None:
    trie = seed_scenario(make_policy("lfu"))
    assert evict_all(trie, 1000.0) == [ONE_OFF, SYSTEM_PROMPT]


def test_cost_aware_values_a_token_of_budget_not_a_whole_edge() -> None:
    # The prompt's 2 hits have decayed to ~1 by t=602 (H = 0.997 x 1.0057 per
    # token); the one-off has 3 nearly fresh hits (H = 2.997 x 1.0005). Cost is
    # divided by size, so 47 tokens used once are worth less per token of
    # budget than 4 tokens used three times: every policy drops the prompt.
    def build(policy: EvictionPolicy) -> RadixTrie:
        trie = RadixTrie(policy)
        hit(trie, SYSTEM_PROMPT, 0.0, 0.0)
        hit(trie, ONE_OFF, 600.0, 601.0, 602.0)
        return trie

    assert evict_all(build(make_policy("lru")), 602.0) == [SYSTEM_PROMPT, ONE_OFF]
    assert evict_all(build(make_policy("lfu")), 602.0) == [SYSTEM_PROMPT, ONE_OFF]
    assert evict_all(build(make_policy("cost_aware")), 602.0) == [SYSTEM_PROMPT, ONE_OFF]


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
    assert policy.cost_per_token(turn) == pytest.approx(1 + 52 / 4096)
    # Clock 0, F = 1 each: the second request extended the prompt's leaf, so
    # its unit went to the new turn, not to the prompt.
    assert policy.sort_key(turn, 0.0) == pytest.approx((1 * (1 + 52 / 4096), 0.0, 57))
    assert policy.sort_key(prompt, 0.0) == pytest.approx((1 * (1 + 23.5 / 4096), 0.0, 47))


def test_cost_aware_keeps_deeper_edges_longer_at_equal_size_and_hits() -> None:
    # Same hits, same edge size: the deeper edge attends to more context, so it
    # costs more to prefill again. LRU, blind to depth, goes by recency.
    # cost_aware at t=3 (attention_tokens=10, clock 0, F ~ 1 barely decayed):
    #   a: cost/token 1 + 5/10 = 1.5                        H = 1.499
    #   b: cost/token 1 + 25/10 = 3.5, F 2^(-3/600)          H = 3.488
    #   c: cost/token 3.5, one second fresher               H = 3.492
    #   shared (a leaf once b and c are gone): F ~ 2 (it split from b and
    #   then c branched off it), cost/token 1 + 10/10 = 2   H = 3.988
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
    # No eviction, so the clock stays 0 and only the decay of F ages.
    trie = RadixTrie(make_policy("cost_aware", half_life_s=60.0))
    hit(trie, SYSTEM_PROMPT, 0.0, 1.0, 2.0)  # worth ~3 * 47 at t=2
    hit(trie, ONE_OFF, 1200.0, 1200.0)  # 20 half-lives later: the prompt is worth ~0
    assert evict_all(trie, 1200.0) == [SYSTEM_PROMPT, ONE_OFF]


def test_cost_aware_fresh_leaf_outlives_an_older_leaf_of_equal_size_and_hits() -> None:
    # The aging property, with decay made negligible so only the clock ages.
    # c = cost per token of a 5-token edge at depth 5 = 1 + 2.5/4096.
    policy = CostAwarePolicy(half_life_s=1e12)
    trie = RadixTrie(policy)
    c = 1 + 2.5 / 4096
    old, filler, fresh = run(100, 5), run(200, 5), run(300, 5)
    hit(trie, old, 0.0, 0.0)  # H = 0 + 2c
    hit(trie, filler, 1.0)  # H = 0 + 1c: evicted first, the clock rises to c
    assert [e.tokens for e in trie.evict(5, 1.0)] == [filler]
    assert policy.clock == pytest.approx(c)
    hit(trie, fresh, 2.0, 2.0)  # same size, same hits, H = c + 2c
    old_node, fresh_node = trie.match(old).node, trie.match(fresh).node
    assert policy.priority(old_node, 2.0) == pytest.approx(2 * c)
    assert policy.priority(fresh_node, 2.0) == pytest.approx(3 * c)
    assert evict_all(trie, 2.0) == [old, fresh]


def test_cost_aware_clock_retires_a_once_hot_idle_leaf_where_lfu_never_does() -> None:
    # The cache-pollution fix. A leaf hit 3 times at t=0 (H ~ 3c), then each
    # second a one-off arrives and a budget of 5 tokens forces one eviction.
    # A one-off starts at the clock: H = L + c. Round 1 evicts it at c (L = c),
    # round 2 at 2c (L = 2c); in round 3 the newcomer's 3c beats the old leaf,
    # whose 3 hits have decayed to 2.9896 by t=3. LFU, with no clock, evicts
    # every newcomer for as long as the old burst outweighs one fresh hit.
    hot = run(100, 5)
    newcomers = [run(200 + 100 * i, 5) for i in range(3)]

    def rounds(policy: EvictionPolicy) -> list[list[int]]:
        trie = RadixTrie(policy)
        hit(trie, hot, 0.0, 0.0, 0.0)
        evicted: list[list[int]] = []
        for at_s, tokens in enumerate(newcomers, start=1):
            hit(trie, tokens, float(at_s))
            evicted += [e.tokens for e in trie.evict(5, float(at_s))]
            check_trie(trie)
        return evicted

    assert rounds(make_policy("cost_aware")) == [newcomers[0], newcomers[1], hot]
    assert rounds(make_policy("lfu")) == newcomers
    assert rounds(make_policy("lru")) == [hot, newcomers[0], newcomers[1]]


def test_cost_aware_credits_each_request_to_the_deepest_node_it_reused() -> None:
    # A chat's later turns pass through its earlier turns; those are one
    # conversation continuing, so they do not count as more uses of the
    # earlier nodes (hit_count still counts every pass). A second chat
    # branching off the system prompt is a real second use of it.
    policy = CostAwarePolicy()
    trie = RadixTrie(policy)
    turn1 = SYSTEM_PROMPT + run(5000, 5)
    turn2 = turn1 + run(6000, 5)
    turn3 = turn2 + run(7000, 5)
    other_chat = SYSTEM_PROMPT + run(8000, 5)
    hit(trie, turn1, 0.0)  # one node: prompt + turn 1
    hit(trie, turn2, 0.0)  # extends that leaf: its unit moves to the new leaf
    hit(trie, other_chat, 0.0)  # splits off the prompt: prompt 1 (copied) + 1
    hit(trie, turn3, 0.0)  # passes prompt, turn 1, turn 2; extends turn 2's leaf
    nodes = [trie.match(t).node for t in (SYSTEM_PROMPT, turn1, turn2, turn3, other_chat)]
    assert [n.score for n in nodes] == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert [n.hit_count for n in nodes] == [4, 3, 2, 1, 1]
    hit(trie, other_chat, 0.0)  # the same prompt again ends where it ended
    hit(trie, SYSTEM_PROMPT, 0.0)  # ends exactly at the prompt's node
    assert [n.score for n in nodes] == [3.0, 1.0, 1.0, 1.0, 2.0]


def test_cost_aware_clock_follows_evictions_not_expiry() -> None:
    # Expiry is no capacity decision: the clock must not jump to the value of
    # an idle but valuable prefix, or every later prefix would start above it.
    policy = CostAwarePolicy(ttl_s=100.0)
    trie = RadixTrie(policy)
    hit(trie, SYSTEM_PROMPT, *(float(t) for t in range(20)))
    hit(trie, ONE_OFF, 200.0)
    assert [e.tokens for e in trie.expire(200.0)] == [SYSTEM_PROMPT]
    assert policy.clock == 0.0
    assert [e.tokens for e in trie.evict(0, 200.0)] == [ONE_OFF]
    assert policy.clock == pytest.approx(1 + 2 / 4096)


def test_cost_aware_clock_never_goes_back() -> None:
    # A parent that becomes a leaf after a long idle spell may rank below the
    # clock; evicting it must not lower the clock.
    policy = CostAwarePolicy(half_life_s=1.0)
    trie = RadixTrie(policy)
    hit(trie, run(100, 5), 0.0)
    hit(trie, run(200, 5), 0.0)
    trie.evict(5, 0.0)  # evicts one fresh leaf at H = c
    clock = policy.clock
    assert clock == pytest.approx(1 + 2.5 / 4096)
    trie.evict(0, 100.0)  # the other has decayed to ~0: H ~ 0 < clock
    assert policy.clock == clock


# -------------------------------------------------------------------------- ttl


def test_ttl_policy_expires_idle_leaves_regardless_of_capacity() -> None:
    trie = RadixTrie(make_policy("ttl", ttl_s=100.0))
    hit(trie, run(100, 3), 0.0)
    hit(trie, run(200, 3), 50.0)
    hit(trie, run(300, 3), 100.0)
    assert trie.evict(1_000_000, 160.0) == []  # plenty of room
    evicted = trie.expire(160.0)  # cutoff 60
    check_trie(trie)
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
    check_trie(trie)
    assert [e.tokens for e in trie.evict(3, 170.0)] == [run(200, 3)]
    check_trie(trie)


def test_cost_aware_with_ttl_expires_even_the_valuable_deep_node() -> None:
    trie = seed_scenario(make_policy("cost_aware", ttl_s=300.0))
    assert trie.expire(1000.0) == [EvictedPrefix(SYSTEM_PROMPT, 47)]
    check_trie(trie)
    assert trie.match(ONE_OFF).matched_tokens == 4


def test_expire_removes_in_policy_order() -> None:
    # Both expired: LRU removes the older first, cost-aware the cheaper first
    # (at t=500 the prompt is worth 1.69 x 1.0057, the one-off 0.57 x 1.0005).
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
    check_trie(trie)
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


@pytest.mark.parametrize("name", ["lru", "lfu", "ttl"])
def test_policies_without_a_clock_ignore_on_evict(name: str) -> None:
    policy = make_policy(name, ttl_s=60.0)
    trie = RadixTrie(policy)
    hit(trie, [1, 2, 3], 7.0)
    node = trie.match([1, 2, 3]).node
    before = policy.sort_key(node, 8.0)
    policy.on_evict(node, (1e9, 0.0, 0))
    assert policy.sort_key(node, 8.0) == before


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sort_keys_end_with_last_access_then_depth(name: str) -> None:
    policy = make_policy(name, ttl_s=60.0)
    trie = RadixTrie(policy)
    hit(trie, [1, 2, 3], 7.0)
    node = trie.match([1, 2, 3]).node
    assert policy.sort_key(node, 8.0)[-2:] == (7.0, 3)
