"""ModelPresence and PresenceBook: which upstream holds which prefix, per-upstream LRU, learning.

Prompts are small token lists so every split and every eviction can be
written out. The property machines draw prompts from a five-token alphabet so
they share prefixes and split each other's edges, and recount both the trie
and the presence after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvern.config import EvictionConfig, RoutingConfig, TrieConfig
from kvern.routing.book import PresenceBook, RouteHandle
from kvern.routing.prefix_answer import InFlightPrefix
from kvern.routing.presence import ModelPresence, PresenceStats
from kvern.routing.presence_match import PresenceMatch, UpstreamCache
from kvern.tracking.forest import ModelTrie, TrieForest
from kvern.trie import RadixTrie, TrieNode
from kvern.trie.invariants import check_trie

Seq = tuple[int, ...]


class Clock:
    """Hand-driven seconds: each tick is one second later."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def tick(self) -> float:
        self.now_s += 1.0
        return self.now_s


def make_presence(
    *caches: UpstreamCache, learn: bool = True, proof_blocks: int = 4
) -> tuple[RadixTrie, ModelPresence]:
    trie = RadixTrie()
    return trie, ModelPresence(trie, list(caches), learn=learn, proof_blocks=proof_blocks)


def cache(name: str, capacity_tokens: int = 1_000, block_size: int = 1) -> UpstreamCache:
    return UpstreamCache(name, capacity_tokens, block_size)


def put(
    trie: RadixTrie, presence: ModelPresence, tokens: list[int], name: str, now_s: float
) -> TrieNode:
    """Insert ``tokens`` and mark them held by ``name`` (the router's commit), then recount."""
    node = trie.insert(tokens, now_s).node
    presence.mark(node, name, now_s)
    check(trie, presence)
    return node


def check(trie: RadixTrie, presence: ModelPresence) -> None:
    check_trie(trie)
    presence.check_invariants()


def held(trie: RadixTrie, name: str) -> set[Seq]:
    """Every prefix (ending at a node) that ``name`` is marked as holding."""
    return {
        tuple(trie.prefix_tokens(node))
        for node in trie.iter_nodes()
        if name in (node.upstreams or {})
    }


def stats(presence: ModelPresence, name: str) -> PresenceStats:
    return presence.stats()[name]


# ------------------------------------------------------------------ matching


def test_marked_prompt_matches_only_on_its_upstream() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [1, 2, 3, 4, 5, 6, 7, 8], "a", 1.0)

    match = presence.match([1, 2, 3, 4, 5, 6, 7, 8, 9])

    assert match.depth == {"a": 8}
    assert match.cached(cache("a")) == 8
    assert match.cached(cache("b")) == 0
    assert presence.match([7, 7, 7]).depth == {}


def test_match_gives_each_upstream_its_own_contiguous_prefix() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [1, 2, 3, 4, 5, 6, 7, 8], "a", 1.0)
    # Splits a's edge after 4 tokens; b holds the shared head and its own tail.
    put(trie, presence, [1, 2, 3, 4, 9, 9], "b", 2.0)

    assert presence.match([1, 2, 3, 4, 5, 6, 7, 8]).depth == {"a": 8, "b": 4}
    assert presence.match([1, 2, 3, 4, 9, 9, 1]).depth == {"a": 4, "b": 6}
    # A prompt that leaves the path inside an edge holds only up to the divergence.
    assert presence.match([1, 2, 3, 4, 5, 6, 0]).depth == {"a": 6, "b": 4}
    assert presence.match([1, 2, 0]).depth == {"a": 2, "b": 2}


def test_match_of_an_empty_prompt_holds_nothing() -> None:
    trie, presence = make_presence(cache("a"))
    put(trie, presence, [1, 2, 3], "a", 1.0)

    match = presence.match([])

    assert match.depth == {}
    assert match.cached(cache("a")) == 0


@pytest.mark.parametrize(
    ("num_tokens", "num_held", "block_size", "expected"),
    [
        (33, 33, 16, 32),  # the last prompt token is always recomputed
        (32, 32, 16, 16),  # ... so a fully held 2-block prompt reuses one block
        (20, 20, 16, 16),
        (16, 16, 16, 0),
        (40, 31, 16, 16),  # the held part is floored to whole blocks
        (40, 31, 1, 31),
        (1, 1, 1, 0),
    ],
)
def test_cached_is_whole_blocks_of_the_held_prefix_without_the_last_token(
    num_tokens: int, num_held: int, block_size: int, expected: int
) -> None:
    trie, presence = make_presence(cache("a", block_size=block_size))
    prompt = list(range(1, num_tokens + 1))
    put(trie, presence, prompt[:num_held], "a", 1.0)
    trie.insert(prompt, 2.0)  # the rest of the prompt is known but not held

    match = presence.match(prompt)

    assert match.depth == {"a": num_held}
    assert match.cached(cache("a", block_size=block_size)) == expected


def test_trusted_cached_counts_only_marks_made_before_trusted_before() -> None:
    a = cache("a", block_size=4)
    trie, presence = make_presence(a)
    put(trie, presence, list(range(1, 9)), "a", 1.0)  # 8 tokens, marked at t=1
    put(trie, presence, list(range(1, 17)), "a", 5.0)  # extends it to 16, re-marks the head
    prompt = list(range(1, 21))

    match = presence.match(prompt)

    assert match.cached(a) == 16
    # A request routed at t=3 or t=5 may still be prefilling what was marked at t=5.
    assert match.trusted_cached(a, trusted_before=3.0) == 0
    assert match.trusted_cached(a, trusted_before=5.0) == 0
    assert match.trusted_cached(a, trusted_before=6.0) == 16


def test_trusted_cached_stops_at_the_first_mark_made_after_trusted_before() -> None:
    a, b = cache("a", block_size=4), cache("b")
    trie, presence = make_presence(a, b)
    put(trie, presence, list(range(1, 9)), "a", 1.0)
    # b holds the extended prompt from t=5; a's mark on the head stays at t=1.
    put(trie, presence, list(range(1, 17)), "b", 5.0)
    put(trie, presence, list(range(1, 17)), "a", 5.0)
    put(trie, presence, list(range(1, 9)) + [0], "b", 7.0)  # re-marks the head on b only

    match = presence.match(list(range(1, 21)))

    assert match.depth == {"a": 16, "b": 16}
    assert match.trusted_cached(a, trusted_before=6.0) == 16
    # b's head was marked at t=7, after trusted_before: nothing below it counts.
    assert match.trusted_cached(b, trusted_before=6.0) == 0
    assert match.trusted_cached(a, trusted_before=3.0) == 0


def test_fill_is_the_share_of_the_budget_held() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=20), cache("b", capacity_tokens=10))
    put(trie, presence, [1, 2, 3, 4, 5], "a", 1.0)

    assert presence.match([1]).fill == {"a": 0.25, "b": 0.0}


def test_assigned_counts_every_token_newly_marked_on_an_upstream_evicted_or_not() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=6), cache("b"))
    put(trie, presence, [1, 2, 3], "a", 1.0)
    put(trie, presence, [1, 2, 3, 4], "a", 2.0)  # only the new token counts
    put(trie, presence, [5, 6, 7, 8], "a", 3.0)  # evicts [1, 2, 3, 4]: still sent there
    put(trie, presence, [1, 2, 3], "b", 4.0)

    assert presence.match([1]).assigned == {"a": 8, "b": 3}
    assert stats(presence, "a").tokens == 4


def test_a_tenants_shared_prompt_is_hot_within_seconds_of_its_burst() -> None:
    trie, presence = make_presence(cache("a"))
    system = [1, 2, 3, 4]
    for k in range(20):  # 20 sessions in 4 s, each its own question after the shared prompt
        put(trie, presence, system + [100 + k], "a", 1.0 + k * 0.2)
    now = 5.0

    match = presence.match(system + [999])

    # Every pass through it counts, over no less than five seconds.
    assert match.requests_per_s(len(system), now) == pytest.approx(20 / 5.0)


def test_a_conversations_own_turns_never_make_its_newest_node_hot() -> None:
    trie, presence = make_presence(cache("a"))
    turns = [[1, 2, 3, 4, 5]]
    for k in range(6):  # six fast turns, half a second apart
        turns.append(turns[-1] + [10 + k])
    for k, prompt in enumerate(turns):
        put(trie, presence, prompt, "a", 1.0 + 0.5 * k)
    now = 4.0

    rate = presence.match(turns[-1] + [99]).requests_per_s(len(turns[2]), now)

    assert 0 < rate < RoutingConfig().hot_prefix_per_s


# ------------------------------------------------------------------ LRU budget


def test_lru_drops_the_least_recently_used_tail_first() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=10))
    put(trie, presence, [1, 2, 3, 4, 5, 6], "a", 1.0)
    put(trie, presence, [1, 2, 3, 4, 7, 8], "a", 2.0)  # head [1..4] shared, 8 tokens held
    assert held(trie, "a") == {(1, 2, 3, 4), (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 7, 8)}

    put(trie, presence, [9, 9, 9], "a", 3.0)  # 11 > 10: the older tail goes

    assert held(trie, "a") == {(1, 2, 3, 4), (1, 2, 3, 4, 7, 8), (9, 9, 9)}
    assert stats(presence, "a").tokens == 9
    assert stats(presence, "a").evicted_tokens == 2


def test_lru_never_drops_a_prefix_before_its_tails() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=10))
    put(trie, presence, [1, 2, 3, 4, 5, 6], "a", 1.0)
    put(trie, presence, [1, 2, 3, 4, 7, 8], "a", 2.0)
    put(trie, presence, [9, 9, 9], "a", 3.0)

    put(trie, presence, [8, 8, 8, 8], "a", 4.0)  # 13 > 10: tail [7, 8], then the head

    assert held(trie, "a") == {(9, 9, 9), (8, 8, 8, 8)}
    assert stats(presence, "a").tokens == 7
    assert stats(presence, "a").evicted_tokens == 2 + 2 + 4


def test_remarking_a_tail_makes_the_other_tail_the_older_one() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=10))
    put(trie, presence, [1, 2, 3, 4, 5, 6], "a", 1.0)
    put(trie, presence, [1, 2, 3, 4, 7, 8], "a", 2.0)
    put(trie, presence, [1, 2, 3, 4, 5, 6], "a", 3.0)  # used again

    put(trie, presence, [9, 9, 9], "a", 4.0)

    assert held(trie, "a") == {(1, 2, 3, 4), (1, 2, 3, 4, 5, 6), (9, 9, 9)}


def test_a_prompt_longer_than_the_budget_keeps_the_head_that_fits() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=4))
    trie.insert([1, 2, 3], 1.0)

    put(trie, presence, [1, 2, 3, 4, 5, 6, 7, 8], "a", 2.0)

    assert held(trie, "a") == {(1, 2, 3)}
    assert presence.match([1, 2, 3, 4, 5, 6, 7, 8]).depth == {"a": 3}


def test_each_upstream_is_held_to_its_own_budget() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=5), cache("b", capacity_tokens=50))
    for i in range(6):
        node = trie.insert([i, i, i], float(i)).node
        presence.mark(node, "a", float(i))
        presence.mark(node, "b", float(i))
        check(trie, presence)

    assert held(trie, "a") == {(5, 5, 5)}
    assert len(held(trie, "b")) == 6
    assert stats(presence, "a").tokens == 3
    assert stats(presence, "b").tokens == 18


def test_mark_of_an_unknown_upstream_is_ignored() -> None:
    trie, presence = make_presence(cache("a"))
    put(trie, presence, [1, 2, 3], "nobody", 1.0)

    assert held(trie, "nobody") == set()
    assert set(presence.stats()) == {"a"}


# ------------------------------------------------------------------ the trie's listener


def test_a_split_keeps_marks_and_token_counts_on_both_halves() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [1, 2, 3, 4, 5, 6, 7, 8], "a", 1.0)

    trie.insert([1, 2, 3, 9], 2.0)  # splits a's edge after 3 tokens; nobody marks it
    check(trie, presence)

    assert held(trie, "a") == {(1, 2, 3), (1, 2, 3, 4, 5, 6, 7, 8)}
    assert stats(presence, "a").tokens == 8
    assert presence.match([1, 2, 3, 9]).depth == {"a": 3}


def test_presence_stays_ancestor_closed_when_lru_evicts_after_a_split() -> None:
    trie, presence = make_presence(cache("a", capacity_tokens=10), cache("b"))
    trie.insert([1, 2, 3, 4, 5, 6], 1.0)
    trie.insert([1, 2, 9], 2.0)  # [1, 2] -> [3, 4, 5, 6]
    put(trie, presence, [1, 2, 3, 4, 5, 6, 7, 8], "a", 3.0)  # a: [7, 8], [3..6], [1, 2]
    # Another upstream's request splits [3..6] into [3, 4] -> [5, 6]; a's LRU
    # gets [3, 4] after [1, 2].
    put(trie, presence, [1, 2, 3, 4, 0], "b", 4.0)

    # 15 tokens > 10: the LRU drops [7, 8], [5, 6] and [1, 2] -- but keeps [3, 4].
    node = trie.insert([7, 7, 7, 7, 7, 7, 7], 5.0).node
    presence.mark(node, "a", 5.0)

    presence.check_invariants()  # "presence must be ancestor-closed"


def test_trie_eviction_removes_marks_and_their_tokens() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [7, 7], "b", 1.0)
    put(trie, presence, [1, 2, 3, 4], "a", 2.0)
    put(trie, presence, [1, 2, 3, 4, 5, 6], "b", 3.0)

    evicted = trie.evict(max_tokens=5, now_s=4.0)  # the trie's LRU leaves: [7, 7], [5, 6]
    check(trie, presence)

    assert [e.tokens for e in evicted] == [[7, 7], [1, 2, 3, 4, 5, 6]]
    assert held(trie, "a") == {(1, 2, 3, 4)}
    assert held(trie, "b") == {(1, 2, 3, 4)}
    assert stats(presence, "a").tokens == 4
    assert stats(presence, "b").tokens == 4
    assert presence.match([7, 7]).depth == {}


def test_trie_eviction_of_everything_leaves_no_tokens_held() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [1, 2, 3, 4], "a", 1.0)
    put(trie, presence, [1, 2, 5], "b", 2.0)

    trie.evict(max_tokens=0, now_s=3.0)
    check(trie, presence)

    assert stats(presence, "a").tokens == 0
    assert stats(presence, "b").tokens == 0


def test_drop_upstream_empties_only_that_upstream() -> None:
    trie, presence = make_presence(cache("a"), cache("b"))
    put(trie, presence, [1, 2, 3, 4], "a", 1.0)
    put(trie, presence, [1, 2, 3, 4, 5], "b", 2.0)
    put(trie, presence, [6, 6], "a", 3.0)

    presence.drop_upstream("a")
    check(trie, presence)

    assert held(trie, "a") == set()
    assert stats(presence, "a").tokens == 0
    assert held(trie, "b") == {(1, 2, 3, 4), (1, 2, 3, 4, 5)}
    assert presence.match([1, 2, 3, 4, 5, 6]).depth == {"b": 5}
    assert trie.num_tokens == 7  # the trie itself keeps every prefix


# ------------------------------------------------------------------ correcting from reports


def correction_setup(
    *, learn: bool = True, capacity_tokens: int = 1_000
) -> tuple[RadixTrie, ModelPresence, list[int], UpstreamCache]:
    """a holds, oldest first: X (t=1), the route's path (t=2), Y (t=3), Z (t=5).

    The route's path is [1..8] -> [9..16]; the request asks for [1..16, 17, 18, 19, 20].
    Returns the trie, the presence, the request's prompt and a's cache (block 4).
    """
    a = cache("a", capacity_tokens=capacity_tokens, block_size=4)
    trie, presence = make_presence(a, learn=learn, proof_blocks=2)
    put(trie, presence, [30, 30, 30, 30], "a", 1.0)  # X
    trie.insert(list(range(1, 9)) + [0], 1.5)  # splits the path after 8 tokens
    put(trie, presence, list(range(1, 17)), "a", 2.0)
    put(trie, presence, [31, 31, 31, 31], "a", 3.0)  # Y
    put(trie, presence, [32, 32, 32, 32], "a", 5.0)  # Z
    prompt = list(range(1, 21))
    return trie, presence, prompt, a


def test_a_report_below_a_trusted_prediction_drops_marks_older_than_the_evicted_node() -> None:
    trie, presence, prompt, a = correction_setup()
    match = presence.match(prompt)
    marks, predicted = match.marks("a"), match.cached(a)
    trusted = match.trusted_cached(a, trusted_before=10.0)
    assert (predicted, trusted) == (16, 16)
    put(trie, presence, prompt, "a", 6.0)  # the request's own commit re-marks its path
    before = stats(presence, "a").tokens

    # The replica had [1..8] but not [9..16]: the node marked at t=2 is gone,
    # and with it X (t=1); Y (t=3) and Z (t=5) are newer and stay.
    presence.correct("a", marks, trusted, predicted, reported=8)
    check(trie, presence)

    assert held(trie, "a") == {
        (31, 31, 31, 31),
        (32, 32, 32, 32),
        tuple(range(1, 9)),
        tuple(range(1, 17)),
        tuple(range(1, 21)),
    }
    assert stats(presence, "a").confirmed_misses == 1
    assert stats(presence, "a").corrected_tokens == 4
    assert stats(presence, "a").tokens == before - 4


def test_a_report_below_a_trusted_prediction_drops_the_evicted_node_itself() -> None:
    trie, presence, prompt, a = correction_setup()
    match = presence.match(prompt)
    marks = match.marks("a")
    trusted = match.trusted_cached(a, trusted_before=10.0)

    presence.correct("a", marks, trusted, match.cached(a), reported=8)
    check(trie, presence)

    # Nothing re-marked the path, so the node marked at t=2 goes along with X.
    after = held(trie, "a")
    assert tuple(range(1, 17)) not in after
    assert (30, 30, 30, 30) not in after
    assert {(31, 31, 31, 31), (32, 32, 32, 32)} <= after


def test_a_confirmed_miss_pulls_the_budget_a_quarter_of_the_way_toward_what_remains() -> None:
    trie, presence, prompt, a = correction_setup(capacity_tokens=1_000)
    match = presence.match(prompt)
    trusted = match.trusted_cached(a, trusted_before=10.0)

    presence.correct("a", match.marks("a"), trusted, match.cached(a), reported=8)

    remaining = stats(presence, "a").tokens
    assert remaining == 8
    target = max(remaining, 1_000 / 16)  # never below a sixteenth of the capacity
    assert stats(presence, "a").budget == 1_000 + (target - 1_000) / 4


def test_repeated_misses_never_push_the_budget_below_a_sixteenth_of_capacity() -> None:
    trie, presence, prompt, a = correction_setup(capacity_tokens=320)
    match = presence.match(prompt)
    marks, trusted = match.marks("a"), match.trusted_cached(a, trusted_before=10.0)
    budgets = []
    for _ in range(12):
        presence.correct("a", marks, trusted, match.cached(a), reported=0)
        budgets.append(stats(presence, "a").budget)

    assert budgets == sorted(budgets, reverse=True)
    assert budgets[-1] >= 320 / 16
    assert budgets[-1] - 320 / 16 < 320 * 0.75**12  # converging on the floor
    assert stats(presence, "a").confirmed_misses == 12


def test_a_confirmed_miss_without_learning_keeps_the_budget() -> None:
    trie, presence, prompt, a = correction_setup(learn=False)
    match = presence.match(prompt)
    trusted = match.trusted_cached(a, trusted_before=10.0)

    presence.correct("a", match.marks("a"), trusted, match.cached(a), reported=0)

    assert stats(presence, "a").corrected_tokens > 0
    assert stats(presence, "a").budget == 1_000


def test_a_miss_on_marks_not_yet_trusted_corrects_nothing() -> None:
    trie, presence, prompt, a = correction_setup()
    match = presence.match(prompt)
    # Everything on the path was marked at t=2: a request routed at t=2 may
    # still be prefilling it, so a low report proves nothing.
    trusted = match.trusted_cached(a, trusted_before=2.0)
    assert trusted == 0
    before = held(trie, "a")

    presence.correct("a", match.marks("a"), trusted, match.cached(a), reported=0)

    assert held(trie, "a") == before
    assert stats(presence, "a").confirmed_misses == 0
    assert stats(presence, "a").budget == 1_000


def test_a_report_less_than_a_block_below_the_prediction_corrects_nothing() -> None:
    trie, presence, prompt, a = correction_setup()
    match = presence.match(prompt)
    before = held(trie, "a")

    presence.correct("a", match.marks("a"), 16, 16, reported=13)

    assert held(trie, "a") == before
    assert stats(presence, "a") == PresenceStats(tokens=28, budget=1_000.0)


def test_a_report_above_the_prediction_raises_the_budget_up_to_four_times_capacity() -> None:
    a = cache("a", capacity_tokens=100, block_size=4)
    trie, presence = make_presence(a)
    put(trie, presence, [1, 2, 3, 4], "a", 1.0)
    match = presence.match([5, 6, 7, 8, 9])

    presence.correct("a", match.marks("a"), 0, 0, reported=40)
    assert stats(presence, "a").budget == 140
    presence.correct("a", match.marks("a"), 0, 0, reported=3)  # within a block: no news
    assert stats(presence, "a").budget == 140
    for _ in range(10):
        presence.correct("a", match.marks("a"), 0, 0, reported=200)

    assert stats(presence, "a").budget == 400
    assert stats(presence, "a").unexpected_hits == 11
    assert held(trie, "a") == {(1, 2, 3, 4)}


def test_a_report_above_the_prediction_without_learning_keeps_the_budget() -> None:
    a = cache("a", capacity_tokens=100, block_size=4)
    trie, presence = make_presence(a, learn=False)

    presence.correct("a", [], 0, 0, reported=40)

    assert stats(presence, "a").budget == 100
    assert stats(presence, "a").unexpected_hits == 1


# ------------------------------------------------------------------ PresenceBook


def model_trie(forest: TrieForest, model: str = "m") -> ModelTrie:
    return forest.get(model)


@pytest.fixture
def forest() -> TrieForest:
    return TrieForest(TrieConfig.model_validate({}), EvictionConfig.model_validate({}))


def make_book(*caches: UpstreamCache, trusted_before: float = float("inf")) -> PresenceBook:
    return PresenceBook(caches, learn=True, trusted_before=lambda name: trusted_before)


def predict(
    book: PresenceBook, mt: ModelTrie, ids: list[int], upstream: str, now_s: float
) -> tuple[PresenceMatch, RouteHandle]:
    """What the tracker does before inserting a prompt: match every upstream, then the handle."""
    match = book.for_model(mt).match(ids)
    return match, book.handle(match, upstream, now_s, mt.model, ids)


def test_book_predicts_commits_and_settles_a_conversation(forest: TrieForest) -> None:
    a, b = cache("a", block_size=4), cache("b", block_size=4)
    book = make_book(a, b)
    mt = model_trie(forest)
    turn1 = list(range(1, 21))

    match, handle = predict(book, mt, turn1, "a", now_s=1.0)
    assert (handle.predicted, handle.trusted) == (0, 0)
    node = mt.trie.insert(turn1, 1.0).node
    book.commit(mt, node, "a", 1.0)
    answer = mt.trie.insert(turn1 + [21, 22, 23, 24], 2.0, count_hit=False).node
    book.settle(mt, answer, handle, "a", reported=0, now_s=2.0)

    turn2 = turn1 + [21, 22, 23, 24, 25, 26]
    match, handle = predict(book, mt, turn2, "a", now_s=3.0)
    assert match.depth == {"a": 24}
    assert (handle.predicted, handle.trusted) == (24, 24)
    _, handle_b = predict(book, mt, turn2, "b", now_s=3.0)
    assert (handle_b.predicted, handle_b.trusted) == (0, 0)


@pytest.mark.parametrize(
    ("trusted_before", "now_s", "expected_trusted"),
    [
        (1.5, 3.0, 0),  # a prefill routed at t=1.5 may still be computing the t=2 marks
        (2.5, 3.0, 16),
        (float("inf"), 2.0, 0),  # nothing awaiting: trusted up to now, not including it
        (float("inf"), 3.0, 16),
    ],
)
def test_book_trusts_only_marks_older_than_the_upstreams_oldest_prefill(
    forest: TrieForest, trusted_before: float, now_s: float, expected_trusted: int
) -> None:
    a = cache("a", block_size=4)
    book = make_book(a, trusted_before=trusted_before)
    mt = model_trie(forest)
    first = mt.trie.insert(list(range(1, 9)), 1.0).node
    book.commit(mt, first, "a", 1.0)
    second = mt.trie.insert(list(range(1, 17)), 2.0).node
    book.commit(mt, second, "a", 2.0)

    _, handle = predict(book, mt, list(range(1, 21)), "a", now_s=now_s)

    assert (handle.predicted, handle.trusted) == (16, expected_trusted)


def test_book_settle_by_another_upstream_marks_it_without_correcting(forest: TrieForest) -> None:
    a, b = cache("a", block_size=4), cache("b", block_size=4)
    book = make_book(a, b)
    mt = model_trie(forest)
    node = mt.trie.insert(list(range(1, 17)), 1.0).node
    book.commit(mt, node, "a", 1.0)
    prompt = list(range(1, 21))
    _, handle = predict(book, mt, prompt, "a", now_s=2.0)
    node = mt.trie.insert(prompt, 2.0).node
    book.commit(mt, node, "a", 2.0)

    book.settle(mt, node, handle, "b", reported=0, now_s=3.0)  # failed over to b

    presence = book.for_model(mt)
    assert presence.match(prompt).depth == {"a": 20, "b": 20}
    assert stats(presence, "a").confirmed_misses == 0


def test_book_settle_of_an_evicted_node_marks_nothing(forest: TrieForest) -> None:
    book = make_book(cache("a"))
    mt = model_trie(forest)
    prompt = [1, 2, 3, 4]
    _, handle = predict(book, mt, prompt, "a", now_s=1.0)
    node = mt.trie.insert(prompt, 1.0).node
    mt.trie.evict(0, 2.0)

    book.settle(mt, node, handle, "a", reported=None, now_s=3.0)

    assert stats(book.for_model(mt), "a").tokens == 0


def test_book_handle_for_an_unknown_upstream_predicts_nothing(forest: TrieForest) -> None:
    book = make_book(cache("a"))
    mt = model_trie(forest)
    node = mt.trie.insert([1, 2, 3, 4], 1.0).node
    book.commit(mt, node, "a", 1.0)

    _, handle = predict(book, mt, [1, 2, 3, 4, 5], "elsewhere", now_s=2.0)

    assert (handle.upstream, handle.predicted, handle.trusted, handle.marks) == (
        "elsewhere",
        0,
        0,
        [],
    )


def test_book_drop_upstream_forgets_it_in_every_model(forest: TrieForest) -> None:
    book = make_book(cache("a"), cache("b"))
    for model in ("m1", "m2"):
        mt = model_trie(forest, model)
        node = mt.trie.insert([1, 2, 3], 1.0).node
        book.commit(mt, node, "a", 1.0)
        book.commit(mt, node, "b", 1.0)

    book.drop_upstream("a")

    assert {m: {n: s.tokens for n, s in per.items()} for m, per in book.stats().items()} == {
        "m1": {"a": 0, "b": 3},
        "m2": {"a": 0, "b": 3},
    }


# ------------------------------------------------------------------ properties


def assert_tails_before_prefixes(presence: ModelPresence) -> None:
    """Every held node comes before its held parent in its upstream's LRU order.

    White-box (the LRU is private): this order is what makes any cut of the
    LRU -- by the budget or by a correction -- leave presence ancestor-closed,
    so it is checked directly rather than waiting for a cut to land in between.
    """
    for name, lru in presence._lru.items():
        position = {node: i for i, node in enumerate(lru.nodes)}
        for node, i in position.items():
            parent = node.parent
            if parent is not None and parent in position:
                assert i < position[parent], (name, presence.trie.prefix_tokens(node))


TOKENS = st.integers(min_value=0, max_value=4)
PROMPTS = st.lists(TOKENS, min_size=1, max_size=12)
NAMES = ("a", "b", "c")
MAYBE_NAME = st.sampled_from((*NAMES, None))  # None: a request presence never saw routed


class PresenceMachine(RuleBasedStateMachine):
    """Marks, trie evictions and drops on one trie; subclasses add the prompts and budgets.

    After every step: both recounts, every upstream within its budget and its
    count equal to a recount from the nodes still in the trie, and ``match``
    agreeing with the marks along each recent prompt's path.
    """

    budgets: dict[str, int] = {}
    block_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.trie = RadixTrie()
        self.presence = ModelPresence(
            self.trie, [cache(n, c, self.block_size) for n, c in self.budgets.items()]
        )
        self.prompts: list[list[int]] = []

    def send(self, prompt: list[int], name: str | None) -> None:
        """Insert ``prompt`` and mark it on ``name`` (the router's commit)."""
        now = self.clock.tick()
        node = self.trie.insert(prompt, now).node
        if name is not None:
            self.presence.mark(node, name, now, routed=True)
        self.prompts.append(prompt)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def mark_again(self, data: st.DataObject, name: str) -> None:
        if not self.prompts:
            return
        prompt = data.draw(st.sampled_from(self.prompts))
        result = self.trie.match(prompt)
        if result.node is not self.trie.root and result.matched_tokens == result.node.depth:
            self.presence.mark(result.node, name, self.clock.tick())

    @rule(name=st.sampled_from(NAMES), back=st.integers(min_value=0, max_value=4))
    def first_bytes(self, name: str, back: int) -> None:
        """Requests routed up to ``back`` ticks ago still await; the rest are settled."""
        if self.prompts:
            self.presence.in_flight(
                self.presence.match(self.prompts[-1]), name, self.clock.now_s - back
            )

    @rule(share=st.floats(min_value=0.0, max_value=1.0))
    def evict(self, share: float) -> None:
        self.trie.evict(int(self.trie.num_tokens * share), self.clock.tick())

    @rule(name=st.sampled_from(NAMES))
    def drop(self, name: str) -> None:
        self.presence.drop_upstream(name)

    @invariant()
    def recounts(self) -> None:
        check_trie(self.trie)
        self.presence.check_invariants()

    @invariant()
    def within_budget_and_counted_from_the_trie(self) -> None:
        # A recount from the nodes still in the trie: a mark left on a removed
        # node would make the presence's own count larger.
        for name, counted in self.presence.stats().items():
            assert counted.tokens <= counted.budget, name
            recount = sum(len(n.key) for n in self.trie.iter_nodes() if name in (n.upstreams or {}))
            assert recount == counted.tokens, name

    @invariant()
    def what_is_in_flight_is_within_what_is_held(self) -> None:
        for prompt in self.prompts[-3:]:
            match = self.presence.match(prompt)
            for name in NAMES:
                part = self.presence.in_flight(match, name, float("-inf"))
                if part is not None:
                    assert part.settled < match.depth[name]
                    assert part.settled <= part.reach <= match.depth[name]
                    assert part.settled % self.block_size == 0

    @invariant()
    def match_agrees_with_the_marks_on_the_path(self) -> None:
        for prompt in self.prompts[-3:]:
            result = self.trie.match(prompt)
            expected: dict[str, int] = {}
            walk: TrieNode | None = result.node
            while walk is not None and walk is not self.trie.root:
                for name in walk.upstreams or {}:
                    depth = min(walk.depth, result.matched_tokens)
                    expected[name] = max(expected.get(name, 0), depth)
                walk = walk.parent
            assert self.presence.match(prompt).depth == expected


class SplittingPrompts(PresenceMachine):
    """Free-form prompts over a small alphabet: they share heads and split each other's edges."""

    @rule(prompt=PROMPTS, name=MAYBE_NAME)
    def request(self, prompt: list[int], name: str | None) -> None:
        self.send(prompt, name)

    @rule(data=st.data(), more=PROMPTS, name=MAYBE_NAME)
    def next_turn(self, data: st.DataObject, more: list[int], name: str | None) -> None:
        """An earlier prompt plus new tokens (chains of nodes)."""
        if self.prompts:
            self.send(data.draw(st.sampled_from(self.prompts)) + more[:4], name)

    @rule(data=st.data(), name=MAYBE_NAME)
    def branch(self, data: st.DataObject, name: str | None) -> None:
        """An earlier prompt cut short and continued differently (splits an edge)."""
        if self.prompts:
            prompt = data.draw(st.sampled_from(self.prompts))
            cut = data.draw(st.integers(min_value=0, max_value=len(prompt) - 1))
            self.send(prompt[:cut] + [prompt[cut] + 1], name)


class Conversations(PresenceMachine):
    """Linear conversations, each behind its own first token: every turn extends the last.

    Every stored sequence is then a prefix of its conversation's latest turn,
    so inserts add leaves and never split an edge.
    """

    def __init__(self) -> None:
        super().__init__()
        self.latest: list[list[int]] = []

    @rule(prompt=PROMPTS, name=MAYBE_NAME)
    def start(self, prompt: list[int], name: str | None) -> None:
        self.latest.append([100 + len(self.latest), *prompt])
        self.send(self.latest[-1], name)

    @rule(data=st.data(), more=PROMPTS, name=MAYBE_NAME)
    def next_turn(self, data: st.DataObject, more: list[int], name: str | None) -> None:
        if self.latest:
            i = data.draw(st.integers(min_value=0, max_value=len(self.latest) - 1))
            self.latest[i] = self.latest[i] + more
            self.send(self.latest[i], name)


class Reports(PresenceMachine):
    """Budgets a few prompts fill, and reported cached tokens that prove evictions."""

    budgets = {"a": 8, "b": 16, "c": 40}

    @rule(data=st.data(), name=st.sampled_from(NAMES), share=st.floats(0.0, 1.0))
    def report(self, data: st.DataObject, name: str, share: float) -> None:
        if not self.prompts:
            return
        prompt = data.draw(st.sampled_from(self.prompts))
        upstream = cache(name, self.budgets[name], self.block_size)
        match = self.presence.match(prompt)
        predicted = match.cached(upstream)
        trusted = match.trusted_cached(upstream, self.clock.now_s + 0.5)
        reported = int(predicted * share)
        self.presence.correct(name, match.marks(name), trusted, predicted, reported)

    @invariant()
    def lru_order_puts_tails_before_their_prefixes(self) -> None:
        assert_tails_before_prefixes(self.presence)


class RoomySplittingMachine(SplittingPrompts):
    """Budgets no prompt set here fills: only trie evictions and drops remove marks."""

    budgets = {"a": 10_000, "b": 10_000, "c": 10_000}


class ConversationMachine(Conversations, Reports):
    pass


class TightSplittingMachine(SplittingPrompts, Reports):
    pass


FAST = settings(max_examples=40, stateful_step_count=25, deadline=None)

RoomySplittingMachine.TestCase.settings = FAST
test_presence_is_consistent_after_random_splits_and_trie_evictions = RoomySplittingMachine.TestCase

ConversationMachine.TestCase.settings = FAST
test_presence_is_consistent_under_lru_pressure_and_corrections = ConversationMachine.TestCase

TightSplittingMachine.TestCase.settings = settings(FAST, max_examples=100, derandomize=True)
test_presence_is_consistent_with_splits_under_lru_pressure = TightSplittingMachine.TestCase


class _Held:
    """A presence source answering a fixed number of tokens (None: no answer now)."""

    def __init__(self, tokens: int | None, batch_s: float = float("inf")) -> None:
        self.tokens = tokens
        self.batch_s = batch_s  # when its latest batch came (inf: it shows everything routed)

    def held_tokens(
        self, model: str, upstream: str, ids: object, as_of_s: float | None = None
    ) -> int | None:
        return self.tokens

    def caught_up_s(self, upstream: str) -> float:
        return self.batch_s


def test_an_upstreams_events_replace_the_model_while_they_answer(forest: TrieForest) -> None:
    a, b = cache("a", block_size=4), cache("b", block_size=4)
    book = make_book(a, b)
    mt = forest.get("m")
    ids = list(range(40))
    match, _ = predict(book, mt, ids, "a", 1.0)
    node = mt.trie.insert(ids, 1.0).node
    book.commit(mt, node, "a", 1.0)
    source = _Held(8)
    book.exact_sources["a"] = source
    match, handle = predict(book, mt, ids, "a", 2.0)
    assert book.cached("m", match, ids) == {"a": 8, "b": 0}
    assert handle.exact and handle.predicted == handle.trusted == 8
    source.tokens = None  # events lost: back to the model (all 40 but the last token)
    match, handle = predict(book, mt, ids, "a", 3.0)
    assert not handle.exact and book.cached("m", match, ids)["a"] == 36


def test_other_instances_routing_raises_the_modelled_presence(forest: TrieForest) -> None:
    a, b = cache("a", block_size=4), cache("b", block_size=4)
    book = make_book(a, b)
    mt = forest.get("m")
    ids = list(range(30))
    book.shared_source = _Held(21)
    match, handle = predict(book, mt, ids, "b", 1.0)
    # Aligned to the block; the request's own last token is never cached.
    assert book.cached("m", match, ids) == {"a": 20, "b": 20}
    assert handle.predicted == 20 and not handle.exact


# ------------------------------------------------------------------ prefixes in flight


def in_flight(book: PresenceBook, mt: ModelTrie, ids: list[int]) -> dict[str, InFlightPrefix]:
    """What the router's answer for ``ids`` says is in flight (the tracker's question)."""
    return book.for_router(mt, book.for_model(mt).match(ids), ids)[1]


def routed_system_prompt(
    forest: TrieForest, oldest_awaiting: dict[str, float]
) -> tuple[PresenceBook, ModelTrie, list[int]]:
    """A book over upstream ``a`` whose waits are ``oldest_awaiting``; 16 tokens routed at t=1."""
    a = cache("a", block_size=4)
    book = PresenceBook([a], learn=True, trusted_before=lambda name: oldest_awaiting[name])
    mt = model_trie(forest)
    system = list(range(1, 17))
    book.commit(mt, mt.trie.insert(system, 1.0).node, "a", 1.0)
    return book, mt, system


def test_a_prefix_just_routed_is_in_flight_until_every_request_routed_by_then_has_a_first_byte(
    forest: TrieForest,
) -> None:
    a = cache("a", block_size=4)
    oldest_awaiting = {"a": 1.0}  # the request routed at t=1 has no first byte yet
    book = PresenceBook([a], learn=True, trusted_before=lambda name: oldest_awaiting[name])
    mt = model_trie(forest)
    system = list(range(1, 17))
    node = mt.trie.insert(system, 1.0).node
    book.commit(mt, node, "a", 1.0)  # routed at t=1: marked before anything was computed

    second = system + [90, 91, 92, 93, 94]
    match = book.for_model(mt).match(second)
    assert book.cached("m", match, second) == {"a": 16}
    part = in_flight(book, mt, second)["a"]
    assert (part.settled, part.marked_s, part.reach) == (0, 1.0, 16)

    oldest_awaiting["a"] = 1.5  # its first byte came; the oldest one left was routed later
    assert in_flight(book, mt, second) == {}


def test_a_hot_prefix_used_again_and_again_stays_settled_whatever_is_awaiting(
    forest: TrieForest,
) -> None:
    # Marks are last-use times, so a hot prefix is always marked moments ago;
    # only its first mark says whether it may still be computing.
    oldest_awaiting = {"a": float("inf")}
    book, mt, system = routed_system_prompt(forest, oldest_awaiting)
    in_flight(book, mt, system)  # seen settled once: forgotten

    for t in (5.0, 6.0, 7.0):  # sessions of the tenant, each still prefilling
        oldest_awaiting["a"] = t
        turn = system + [100 + int(t)] * 8
        book.commit(mt, mt.trie.insert(turn, t).node, "a", t)

    probe = system + [1, 2, 3, 4, 5]
    match = book.for_model(mt).match(probe)
    assert book.cached("m", match, probe) == {"a": 16}
    assert in_flight(book, mt, probe) == {}


def test_what_an_answered_request_marks_is_never_in_flight(forest: TrieForest) -> None:
    a = cache("a", block_size=4)
    book = PresenceBook([a], learn=True, trusted_before=lambda name: 0.0)
    mt = model_trie(forest)
    prompt = list(range(1, 17))
    _, handle = predict(book, mt, prompt, "a", now_s=1.0)
    node = mt.trie.insert(prompt, 1.0).node
    # Served without routing's commit (it went by load): marked once answered.
    book.settle(mt, node, handle, "a", reported=0, now_s=2.0)

    probe = prompt + [50, 51, 52, 53]
    assert in_flight(book, mt, probe) == {}


def test_the_in_flight_part_starts_after_the_prefix_already_computed(forest: TrieForest) -> None:
    oldest_awaiting = {"a": float("inf")}
    book, mt, system = routed_system_prompt(forest, oldest_awaiting)
    in_flight(book, mt, system)  # settled
    oldest_awaiting["a"] = 2.0
    turn = system + list(range(40, 56))  # a conversation's turn routed at t=2, prefilling
    book.commit(mt, mt.trie.insert(turn, 2.0).node, "a", 2.0)

    probe = turn + [7, 7, 7, 7, 7]
    match = book.for_model(mt).match(probe)
    assert book.cached("m", match, probe) == {"a": 32}
    part = in_flight(book, mt, probe)["a"]
    assert (part.settled, part.marked_s, part.reach) == (16, 2.0, 32)


def test_an_upstream_whose_events_show_all_routed_there_has_nothing_in_flight(
    forest: TrieForest,
) -> None:
    a = cache("a", block_size=4)
    book = PresenceBook([a], learn=True, trusted_before=lambda name: 0.0)
    mt = model_trie(forest)
    ids = list(range(1, 21))
    book.commit(mt, mt.trie.insert(ids, 1.0).node, "a", 1.0)
    book.exact_sources["a"] = _Held(16)

    assert in_flight(book, mt, ids) == {}


def test_a_prefix_routed_to_an_event_fed_upstream_counts_until_its_events_can_show_it(
    forest: TrieForest,
) -> None:
    # The engine publishes a block once computed: the tenant's first session,
    # routed to "a" at t=1, is absent from a's events while it prefills. Its
    # second session must still find the prompt on "a" (not compute it on "b").
    a, b = cache("a", block_size=4), cache("b", block_size=4)
    oldest_awaiting = {"a": 1.0, "b": float("inf")}
    book = PresenceBook([a, b], learn=True, trusted_before=lambda name: oldest_awaiting[name])
    events_a, events_b = _Held(0, batch_s=0.5), _Held(0, batch_s=0.5)
    book.exact_sources |= {"a": events_a, "b": events_b}
    mt = model_trie(forest)
    system = list(range(1, 17))
    book.commit(mt, mt.trie.insert(system, 1.0).node, "a", 1.0)

    second = system + [90, 91, 92, 93, 94]
    match = book.for_model(mt).match(second)
    cached, parts = book.for_router(mt, match, second)
    assert cached == {"a": 16, "b": 0}
    assert parts["a"] == InFlightPrefix(0, 1.0, 16)  # nothing of it computed yet: wait for it
    _, handle = predict(book, mt, second, "a", 1.1)
    assert handle.exact and handle.predicted == 16  # from events, raised: nothing to learn

    oldest_awaiting["a"] = float("inf")  # its first byte came, before the batch storing it
    cached, parts = book.for_router(mt, book.for_model(mt).match(second), second)
    assert cached == {"a": 16, "b": 0} and "a" in parts

    events_a.tokens, events_a.batch_s = 16, 1.4  # the batch came: the events tell it all
    cached, parts = book.for_router(mt, book.for_model(mt).match(second), second)
    assert cached == {"a": 16, "b": 0} and parts == {}


def test_a_routed_prefix_the_events_never_showed_stops_counting_after_the_next_batch(
    forest: TrieForest,
) -> None:
    # Evicted at once, or the request failed: the events are the truth again.
    a = cache("a", block_size=4)
    book = PresenceBook([a], learn=True, trusted_before=lambda name: float("inf"))
    events = _Held(4, batch_s=0.5)
    book.exact_sources["a"] = events
    mt = model_trie(forest)
    system = list(range(1, 17))
    book.commit(mt, mt.trie.insert(system, 1.0).node, "a", 1.0)
    probe = system + [7, 7, 7]
    assert book.for_router(mt, book.for_model(mt).match(probe), probe)[0] == {"a": 16}
    part = in_flight(book, mt, probe)["a"]
    assert (part.settled, part.reach) == (4, 16)  # the events' 4 are computed

    events.batch_s = 1.2
    assert book.for_router(mt, book.for_model(mt).match(probe), probe) == ({"a": 4}, {})
