"""Routing policies over candidate snapshots, and the pool state they read (Load, serves).

Candidates are built from a real :class:`UpstreamPool` (no request is ever
sent: the URLs point nowhere), so weights and ``max_concurrency`` come from
validated :class:`UpstreamEntry` config exactly as in production.
"""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvern.config import HealthConfig, RoutingConfig, UpstreamEntry
from kvern.routing.policies import (
    Candidate,
    Choice,
    RoundRobin,
    cache_aware,
    least_load,
    session,
)
from kvern.routing.pool import Load, Replica, UpstreamPool
from kvern.routing.router import fleet_rate_scale, replica_candidate
from kvern.routing.shared_load import FleetShare

CFG = RoutingConfig(min_match_tokens=64)


def replicas(*names: str, weights: dict[str, float] | None = None, limit: int = 0) -> list[Replica]:
    """One replica per name, in order; ``limit`` is every replica's max_concurrency."""
    weights = weights or {}
    entries = [
        UpstreamEntry(
            name=n,
            url="http://127.0.0.1:1/v1",
            weight=weights.get(n, 1.0),
            max_concurrency=limit,
        )
        for n in names
    ]
    return UpstreamPool(entries, HealthConfig()).replicas


def cands(
    *specs: tuple[str, int], weights: dict[str, float] | None = None, limit: int = 0
) -> dict[str, Candidate]:
    """Candidates by name from ``(name, load)`` pairs; set cached/fill/in_flight on them after.

    With no slot count configured a new request waits for all the load ahead
    of it (``wait == load``), as the router computes it.
    """
    reps = replicas(*(n for n, _ in specs), weights=weights, limit=limit)
    return {
        r.name: Candidate(r, load, 0, wait=float(load))
        for r, (_, load) in zip(reps, specs, strict=True)
    }


def names(choice: Choice) -> tuple[str, list[str]]:
    return choice.replica.name, [r.name for r in choice.fallbacks]


# ------------------------------------------------------------------ cache_aware


def test_cache_aware_prefers_the_longest_cached_prefix() -> None:
    c = cands(("a", 0), ("b", 0), ("c", 0))
    c["a"].cached, c["b"].cached, c["c"].cached = 128, 256, 0

    choice = cache_aware(list(c.values()), 300, CFG)

    assert (choice.replica.name, choice.reason, choice.cached) == ("b", "prefix", 256)


def test_cache_aware_equal_prefixes_go_to_the_less_loaded_holder() -> None:
    c = cands(("a", 500), ("b", 100), ("c", 0))
    c["a"].cached = c["b"].cached = 256

    choice = cache_aware(list(c.values()), 300, CFG)

    assert (choice.replica.name, choice.reason) == ("b", "prefix")


def test_cache_aware_spills_when_the_holders_queue_costs_more_than_recomputing() -> None:
    # b: 5000 waiting + 44 uncached; a: 1000 waiting + 300 uncached (its cache is empty).
    c = cands(("a", 1_000), ("b", 5_000))
    c["b"].cached = 256

    choice = cache_aware(list(c.values()), 300, CFG)

    assert names(choice) == ("a", ["b"])
    assert (choice.reason, choice.cached, choice.load) == ("prefix_overloaded", 0, 1_000)
    assert choice.expected == 1_300


@pytest.mark.parametrize(
    ("floor", "holder", "spills"),
    [
        (0, 255, False),  # 255 + 44 < 0 + 300: the holder's first token comes sooner
        (0, 256, False),  # a tie stays with the holder (the cache is kept warm)
        (0, 257, True),  # one token later than recomputing elsewhere
        (4_000, 4_255, False),  # the same margin on top of any load
        (4_000, 4_257, True),
    ],
)
def test_cache_aware_spills_exactly_when_its_first_token_would_come_later(
    floor: int, holder: int, spills: bool
) -> None:
    c = cands(("a", floor), ("b", holder))
    c["b"].cached = 256

    choice = cache_aware(list(c.values()), 300, CFG)

    assert (choice.replica.name, choice.reason) == (
        ("a", "prefix_overloaded") if spills else ("b", "prefix")
    )


def test_cache_aware_counts_the_copy_a_spill_makes_in_a_full_cache() -> None:
    # Recomputing 256 tokens at a (300 + 100 waiting) beats b (500 + 44) by 144,
    # but a's cache is 80% full: the copy costs 0.8 x 256 = 205 more than that.
    c = cands(("a", 100), ("b", 500))
    c["b"].cached = 256
    c["a"].fill = 0.8

    assert cache_aware(list(c.values()), 300, CFG).replica.name == "b"
    free = CFG.model_copy(update={"spill_reuse_weight": 0.0})
    assert cache_aware(list(c.values()), 300, free).replica.name == "a"
    c["a"].fill = 0.0  # an empty cache: the copy evicts nothing
    assert cache_aware(list(c.values()), 300, CFG).replica.name == "a"


def test_cache_aware_compares_expected_first_tokens_per_unit_of_weight() -> None:
    # b holds 5000 tokens of load but has 4x the capacity: (5000 + 44) / 4 < 1000 + 300.
    c = cands(("a", 1_000), ("b", 5_000), weights={"b": 4.0})
    c["b"].cached = 256

    choice = cache_aware(list(c.values()), 300, CFG)

    assert (choice.replica.name, choice.reason) == ("b", "prefix")


def test_a_hot_prefix_whose_holder_is_queued_is_copied_to_a_second_replica_once() -> None:
    # b holds a tenant's 1000-token system prompt and is queued (wait 600): by
    # TTFT alone it stays there (600 + 24 < 0 + 1024), but the prefix is hot.
    c = cands(("a", 0), ("b", 600), ("c", 200))
    c["b"].cached = 1_000

    assert cache_aware(list(c.values()), 1_024, CFG, hot_per_s=0.5).replica.name == "b"
    choice = cache_aware(list(c.values()), 1_024, CFG, hot_per_s=5.0)
    assert (choice.replica.name, choice.reason) == ("a", "replicate")

    # a holds it now: two holders, both queued -- balance among them, no third copy.
    c["a"].cached, c["a"].wait = 1_000, 700.0
    choice = cache_aware(list(c.values()), 1_024, CFG, hot_per_s=5.0)
    assert (choice.replica.name, choice.reason) == ("b", "prefix")


def test_a_hot_prefix_is_not_copied_while_a_holder_has_a_free_slot() -> None:
    c = cands(("a", 0), ("b", 0))
    c["b"].cached = 1_000

    choice = cache_aware(list(c.values()), 1_024, CFG, hot_per_s=50.0)

    assert (choice.replica.name, choice.reason) == ("b", "prefix")


def test_cache_aware_keeps_a_loaded_holder_when_recomputing_elsewhere_is_slower() -> None:
    # b waits 2000, but a would prefill 10000 tokens: b's first token comes sooner.
    c = cands(("a", 0), ("b", 2_000))
    c["b"].cached = 10_000

    choice = cache_aware(list(c.values()), 10_001, CFG)

    assert (choice.replica.name, choice.reason) == ("b", "prefix")


def test_a_replica_with_a_free_slot_makes_a_new_request_wait_nothing() -> None:
    replica = replicas("a", limit=4)[0]
    for i in range(3):
        replica.load.reserve(f"r{i}", 500, 0.0)

    candidate = replica_candidate(replica, decode_load_tokens=100, now_s=0.0)

    assert (candidate.wait, candidate.load, candidate.in_flight) == (0.0, 1_500 + 300, 3)


def test_a_full_replica_makes_a_new_request_wait_for_the_work_ahead_shared_by_its_slots() -> None:
    replica = replicas("a", limit=2)[0]
    for i in range(3):
        replica.load.reserve(f"r{i}", 400, 0.0)
    replica.load.first_byte("r0")  # decoding now: no prefill left

    candidate = replica_candidate(replica, decode_load_tokens=100, now_s=0.0)

    # 800 prefill tokens pending, 3 + 1 - 2 = 2 requests queued ahead of a slot.
    assert candidate.wait == (800 + 2 * 100) / 2


def test_without_a_slot_count_a_new_request_waits_for_all_the_load() -> None:
    replica = replicas("a")[0]
    replica.load.reserve("r0", 400, 0.0)

    assert replica_candidate(replica, decode_load_tokens=100, now_s=0.0).wait == 500


def test_cache_aware_spills_a_queued_holder_to_a_replica_with_a_free_slot() -> None:
    a, b = (replica_candidate(r, 1_000, 0.0) for r in replicas("a", "b", limit=1))
    b.replica.load.reserve("x", 0, 0.0)  # b's only slot is busy: the request would queue
    b = replica_candidate(b.replica, 1_000, 0.0)
    b.cached = 256

    choice = cache_aware([a, b], 300, CFG)

    # b: 1000 waiting for the slot + 44; a: nothing waiting + 300.
    assert (choice.replica.name, choice.reason) == ("a", "prefix_overloaded")


def test_cache_aware_treats_a_prefix_below_min_match_tokens_as_a_miss() -> None:
    # As a prefix b would be kept (100 + 237 uncached < 300).
    c = cands(("a", 0), ("b", 100))
    c["b"].cached = 63

    choice = cache_aware(list(c.values()), 300, CFG)

    assert (choice.replica.name, choice.reason) == ("a", "miss")


def test_cache_aware_miss_picks_the_least_load_plus_uncached_tokens() -> None:
    # a: 100 + 200 = 300 tokens ahead; b: 150 + (200 - 60) = 290.
    c = cands(("a", 100), ("b", 150))
    c["b"].cached = 60

    choice = cache_aware(list(c.values()), 200, CFG)

    assert names(choice) == ("b", ["a"])
    assert choice.reason == "miss"


def test_cache_aware_miss_divides_work_ahead_by_weight() -> None:
    # a: (400 + 100) / 2 = 250; b: (200 + 100) / 1 = 300.
    c = cands(("a", 400), ("b", 200), weights={"a": 2.0})

    assert cache_aware(list(c.values()), 100, CFG).replica.name == "a"


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a")])
def test_cache_aware_miss_ties_go_to_the_emptier_cache(order: tuple[str, ...]) -> None:
    c = cands(*((n, 0) for n in order))
    c["a"].fill, c["b"].fill, c["c"].fill = 0.5, 0.1, 0.3

    choice = cache_aware(list(c.values()), 100, CFG)

    assert (choice.replica.name, choice.reason) == ("b", "miss")


def test_cache_aware_miss_equal_cost_goes_where_recent_demand_is_lightest() -> None:
    c = cands(("a", 0), ("b", 0))
    c["a"].demand, c["b"].demand = 5.0, 1.0
    c["a"].fill, c["b"].fill = 0.0, 0.9  # demand decides before the cache's fill

    assert cache_aware(list(c.values()), 100, CFG).replica.name == "b"


def test_cache_aware_miss_equal_cost_goes_where_the_least_content_was_sent() -> None:
    c = cands(("a", 0), ("b", 0), ("c", 0))
    c["a"].assigned, c["b"].assigned, c["c"].assigned = 9_000, 2_000, 5_000
    c["b"].demand = 9.0  # content sent decides before recent demand

    choice = cache_aware(list(c.values()), 100, CFG)

    assert (choice.replica.name, choice.reason) == ("b", "miss")


def test_cache_aware_miss_weighs_content_sent_by_weight() -> None:
    c = cands(("a", 0), ("b", 0), weights={"a": 4.0})
    c["a"].assigned, c["b"].assigned = 12_000, 4_000  # a: 3,000 per unit of weight

    assert cache_aware(list(c.values()), 100, CFG).replica.name == "a"


def test_cache_aware_miss_goes_where_it_starts_sooner_whatever_the_content_sent() -> None:
    c = cands(("a", 500), ("b", 0))
    c["a"].assigned, c["b"].assigned = 0, 1_000_000

    assert cache_aware(list(c.values()), 100, CFG).replica.name == "b"


# ------------------------------------------------------------------ least_load


def test_least_load_divides_load_by_weight() -> None:
    # a: 100 / 2 = 50 per unit of weight; b: 60.
    c = cands(("a", 100), ("b", 60), weights={"a": 2.0})

    choice = least_load(list(c.values()))

    assert names(choice) == ("a", ["b"])
    assert (choice.reason, choice.load, choice.cached) == ("least_load", 100, 0)


def test_least_load_orders_fallbacks_least_loaded_first_and_full_ones_last() -> None:
    c = cands(("a", 300), ("b", 0), ("c", 200), ("d", 100), limit=4)
    c["b"].in_flight = 4

    assert names(least_load(list(c.values()))) == ("d", ["c", "a", "b"])


def test_least_load_uses_a_full_upstream_only_when_all_are_full() -> None:
    c = cands(("a", 300), ("b", 0), limit=1)
    c["a"].in_flight = c["b"].in_flight = 1

    assert least_load(list(c.values()), "why").replica.name == "b"
    assert least_load(list(c.values()), "why").reason == "why"


def test_least_load_equal_loads_go_to_fewer_requests_in_flight() -> None:
    c = cands(("a", 100), ("b", 100))
    c["a"].in_flight = 2

    assert least_load(list(c.values())).replica.name == "b"


# ------------------------------------------------------------------ round robin


def rr_sequence(weights: dict[str, float], n: int) -> list[str]:
    c = cands(*((name, 0) for name in weights), weights=weights)
    rr = RoundRobin()
    return [rr.choose(list(c.values())).replica.name for _ in range(n)]


def test_round_robin_sends_each_upstream_its_weight_per_cycle() -> None:
    seq = rr_sequence({"a": 3.0, "b": 1.0}, 40)

    for start in range(0, 40, 4):
        assert Counter(seq[start : start + 4]) == {"a": 3, "b": 1}


def test_round_robin_interleaves_instead_of_sending_bursts() -> None:
    # nginx's smooth weighted round robin example: weights 5, 1, 1.
    assert rr_sequence({"a": 5.0, "b": 1.0, "c": 1.0}, 7) == ["a", "a", "b", "a", "c", "a", "a"]
    assert rr_sequence({"a": 1.0, "b": 1.0, "c": 1.0}, 6) == ["a", "b", "c"] * 2


def test_round_robin_choice_falls_back_to_the_others() -> None:
    c = cands(("a", 50), ("b", 0), ("c", 10))

    assert names(RoundRobin().choose(list(c.values()))) == ("a", ["b", "c"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4))
def test_round_robin_stays_within_one_request_of_the_exact_share(weights: list[int]) -> None:
    by_name = {f"u{i}": float(w) for i, w in enumerate(weights)}
    total = sum(weights)
    seq = rr_sequence(by_name, 2 * total)
    counts: Counter[str] = Counter()

    for k, name in enumerate(seq, start=1):
        counts[name] += 1
        for n, w in by_name.items():
            assert abs(counts[n] - Fraction(k * int(w), total)) < 1, (k, n, seq)
    assert counts == {n: 2 * int(w) for n, w in by_name.items()}


# ------------------------------------------------------------------ session

KEYS = [f"user-{i}" for i in range(300)]


def session_homes(names_: list[str]) -> dict[str, Choice]:
    c = cands(*((n, 0) for n in names_))
    return {key: session(list(c.values()), key) for key in KEYS}


def test_session_sends_a_key_to_the_same_upstream_whatever_the_load() -> None:
    quiet = cands(("a", 0), ("b", 0), ("c", 0))
    busy = cands(("a", 9_000), ("b", 0), ("c", 50))

    for key in KEYS[:50]:
        first = session(list(quiet.values()), key)
        assert first.reason == "session"
        assert names(session(list(busy.values()), key)) == names(first)
        assert names(session(list(reversed(busy.values())), key)) == names(first)


def test_session_spreads_keys_over_every_upstream() -> None:
    spread = Counter(c.replica.name for c in session_homes(["a", "b", "c"]).values())

    assert set(spread) == {"a", "b", "c"}
    assert min(spread.values()) > len(KEYS) / 6


def test_session_moves_only_the_keys_of_an_upstream_that_leaves() -> None:
    before = session_homes(["a", "b", "c", "d"])
    after = session_homes(["a", "b", "d"])

    for key in KEYS:
        home, fallbacks = names(before[key])
        if home == "c":
            assert after[key].replica.name == fallbacks[0]  # its stable second home
        else:
            assert after[key].replica.name == home
    assert any(names(before[k])[0] == "c" for k in KEYS)


def test_session_moves_keys_only_to_an_upstream_that_joins() -> None:
    before = session_homes(["a", "b", "c"])
    after = session_homes(["a", "b", "c", "d"])

    moved = [k for k in KEYS if after[k].replica.name != before[k].replica.name]
    assert moved
    assert all(after[k].replica.name == "d" for k in moved)


@pytest.mark.parametrize("key", [None, ""])
def test_session_without_a_key_goes_by_least_load(key: str | None) -> None:
    c = cands(("a", 300), ("b", 100), ("c", 200))

    choice = session(list(c.values()), key)

    assert names(choice) == ("b", ["c", "a"])
    assert choice.reason == "session_none"


# ------------------------------------------------------------------ every policy's Choice

LOADS = st.integers(min_value=0, max_value=20_000)


@st.composite
def candidate_sets(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(min_value=1, max_value=5))
    weights = {f"u{i}": draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for i in range(n)}
    reps = replicas(*weights, weights=weights, limit=draw(st.integers(0, 3)))
    return [
        Candidate(
            r,
            draw(LOADS),
            draw(st.integers(0, 4)),
            cached=draw(st.sampled_from([0, 16, 64, 256, 4_096])),
            fill=draw(st.floats(0.0, 1.0)),
        )
        for r in reps
    ]


@settings(max_examples=100, deadline=None)
@given(cs=candidate_sets(), key=st.one_of(st.none(), st.text(max_size=8)))
def test_every_choice_falls_back_to_all_the_others_once(
    cs: list[Candidate], key: str | None
) -> None:
    everyone = sorted(c.replica.name for c in cs)
    rr = RoundRobin()
    choices = [
        cache_aware(cs, 5_000, CFG),
        least_load(cs),
        rr.choose(cs),
        rr.choose(cs),
        session(cs, key),
    ]
    for choice in choices:
        picked, rest = names(choice)
        assert picked not in rest
        assert sorted([picked, *rest]) == everyone
        chosen = next(c for c in cs if c.replica is choice.replica)
        assert (choice.cached, choice.load) == (chosen.cached, chosen.load)


@settings(max_examples=100, deadline=None)
@given(cs=candidate_sets())
def test_cache_aware_is_slower_than_the_soonest_only_by_the_copy_it_avoids(
    cs: list[Candidate],
) -> None:
    num_tokens = 5_000
    choice = cache_aware(cs, num_tokens, CFG)
    chosen = next(c for c in cs if c.replica is choice.replica)
    soonest = min(cs, key=lambda c: c.cost(num_tokens))
    held = max(c.cached for c in cs)
    copy = CFG.spill_reuse_weight * (held - soonest.cached) * soonest.fill
    copy /= soonest.replica.entry.weight

    assert chosen.cost(num_tokens) <= soonest.cost(num_tokens) + copy + 1e-6
    assert choice.expected == pytest.approx(chosen.cost(num_tokens))


# ------------------------------------------------------------------ the pool


def test_replica_serves_exact_names_and_globs() -> None:
    entry = UpstreamEntry(
        name="a", url="http://127.0.0.1:1/v1", models=["llama-*", "qwen[2]", "exact-model"]
    )
    replica = UpstreamPool([entry], HealthConfig()).replicas[0]

    assert replica.serves("llama-3.2-1b")
    assert replica.serves("exact-model")
    assert replica.serves("qwen[2]")  # exact match of a name that is also a glob
    assert replica.serves("qwen2")
    assert replica.serves(None)  # no model named: every upstream may take it
    assert not replica.serves("Llama-3")  # globs are case-sensitive
    assert not replica.serves("exact-model-2")
    assert not replica.serves("mistral")


def test_pool_lists_the_upstreams_serving_a_model_in_config_order() -> None:
    entries = [
        UpstreamEntry(name="x", url="http://127.0.0.1:1/v1", models=["qwen*"]),
        UpstreamEntry(name="y", url="http://127.0.0.1:2/v1/", kv_capacity_tokens=5, block_size=4),
        UpstreamEntry(name="z", url="http://127.0.0.1:3", models=["qwen2"]),
    ]
    pool = UpstreamPool(entries, HealthConfig(failure_threshold=7))

    assert [r.name for r in pool.serving("qwen2")] == ["x", "y", "z"]
    assert [r.name for r in pool.serving("llama")] == ["y"]
    assert [r.index for r in pool.replicas] == [0, 1, 2]
    assert pool.by_name["y"].cache == pool.caches()[1]
    assert (pool.caches()[1].capacity_tokens, pool.caches()[1].block_size) == (5, 4)
    assert pool.by_name["z"].breaker.failure_threshold == 7


def test_load_end_before_the_first_byte_releases_the_prefill_tokens() -> None:
    load = Load()
    load.reserve("r1", 300, now_s=1.0)
    load.reserve("r2", 50, now_s=2.0)
    assert (load.in_flight, load.prefill_tokens, load.decoding) == (2, 350, 0)

    load.end("r1")

    assert (load.in_flight, load.prefill_tokens, load.decoding) == (1, 50, 0)
    assert load.oldest_awaiting() == 2.0


def test_load_end_after_the_first_byte_releases_a_decode() -> None:
    load = Load()
    load.reserve("r1", 300, now_s=1.0)

    load.first_byte("r1")
    assert (load.in_flight, load.prefill_tokens, load.decoding) == (1, 0, 1)
    assert load.snapshot().tokens(decode_load_tokens=64) == 64
    load.end("r1")

    assert (load.in_flight, load.prefill_tokens, load.decoding) == (0, 0, 0)


def test_load_counts_a_request_once_however_often_it_is_reported() -> None:
    load = Load()
    load.reserve("r1", 300, now_s=1.0)
    load.reserve("r1", 999, now_s=2.0)  # a late routing decision for the same request
    assert (load.in_flight, load.prefill_tokens, load.oldest_awaiting()) == (1, 300, 1.0)
    load.first_byte("r1")
    load.first_byte("r1")
    assert (load.in_flight, load.prefill_tokens, load.decoding) == (1, 0, 1)

    load.end("r1")
    load.end("r1")

    assert (load.in_flight, load.prefill_tokens, load.decoding) == (0, 0, 0)


def test_load_ignores_a_first_byte_or_end_of_a_request_it_does_not_hold() -> None:
    load = Load()
    load.reserve("r1", 300, now_s=1.0)
    load.reserve("r2", 20, now_s=2.0)
    load.end("r2")

    load.first_byte("r2")
    load.end("elsewhere")

    assert (load.in_flight, load.prefill_tokens, load.decoding) == (1, 300, 0)


def test_load_oldest_awaiting_is_the_earliest_request_without_a_first_byte() -> None:
    load = Load()
    assert load.oldest_awaiting() == float("inf")
    load.reserve("r1", 10, now_s=5.0)
    load.reserve("r2", 10, now_s=3.0)
    load.reserve("r3", 10, now_s=4.0)
    assert load.oldest_awaiting() == 3.0

    load.first_byte("r2")
    assert load.oldest_awaiting() == 4.0
    load.end("r3")
    assert load.oldest_awaiting() == 5.0
    load.first_byte("r1")
    assert load.oldest_awaiting() == float("inf")


class LoadMachine(RuleBasedStateMachine):
    """Requests reserve, get a first byte (or not) and end, in any order and any number of times.

    A reference of which requests are awaiting or decoding is kept beside it;
    repeated or stray calls must change nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.load = Load()
        self.ids = itertools.count()
        self.seen: list[str] = []  # every id ever reserved, ended ones included
        self.awaiting: dict[str, tuple[int, float]] = {}  # id -> (prefill tokens, routed at)
        self.decoding: set[str] = set()
        self.now_s = 0.0

    def pick(self, data: st.DataObject) -> str | None:
        return data.draw(st.sampled_from(self.seen)) if self.seen else None

    @rule(tokens=st.integers(min_value=0, max_value=5_000))
    def reserve(self, tokens: int) -> None:
        self.now_s += 1.0
        rid = f"r{next(self.ids)}"
        self.load.reserve(rid, tokens, self.now_s)
        self.awaiting[rid] = (tokens, self.now_s)
        self.seen.append(rid)

    @rule(data=st.data(), tokens=st.integers(min_value=0, max_value=5_000))
    def reserve_again(self, data: st.DataObject, tokens: int) -> None:
        rid = self.pick(data)
        if rid is not None and (rid in self.awaiting or rid in self.decoding):
            self.load.reserve(rid, tokens, self.now_s + 100.0)

    @rule(data=st.data())
    def first_byte(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        if rid is not None:
            self.load.first_byte(rid)
            if self.awaiting.pop(rid, None) is not None:
                self.decoding.add(rid)

    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        if rid is not None:
            self.load.end(rid)
            self.awaiting.pop(rid, None)
            self.decoding.discard(rid)

    @invariant()
    def counters_match_the_requests_in_flight(self) -> None:
        snap = self.load.snapshot()
        assert snap.in_flight == len(self.awaiting) + len(self.decoding)
        assert snap.prefill_tokens == sum(t for t, _ in self.awaiting.values())
        assert snap.decoding == len(self.decoding)
        assert self.load.oldest_awaiting() == min(
            (at for _, at in self.awaiting.values()), default=float("inf")
        )


LoadMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_load_counters_stay_consistent_in_every_order = LoadMachine.TestCase


def test_a_prefix_rate_seen_by_one_of_three_instances_is_scaled_to_the_fleets() -> None:
    entries = [UpstreamEntry(name=n, url="http://127.0.0.1:1/v1") for n in ("a", "b")]
    a, b = UpstreamPool(entries, HealthConfig()).replicas
    for i in range(4):
        a.load.reserve(f"a{i}", 10, now_s=0.0)
        b.load.reserve(f"b{i}", 10, now_s=0.0)
    share = FleetShare(in_flight=0, prefill_tokens=0, decoding=0, demand=8.0)
    alone = [replica_candidate(r, 64, 0.0) for r in (a, b)]
    shared = [replica_candidate(r, 64, 0.0, share) for r in (a, b)]

    assert fleet_rate_scale(alone) == 1.0
    # Others sent twice this instance's requests: the fleet's rate is 3x what it counts.
    assert fleet_rate_scale(shared) == pytest.approx(3.0)
