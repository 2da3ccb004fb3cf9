"""When a request routed now would get a running slot: learned per replica, played forward."""

from __future__ import annotations

import pytest

from kvern.config import HealthConfig, UpstreamEntry
from kvern.routing import pool as pool_module
from kvern.routing.pool import Replica, UpstreamPool
from kvern.routing.queue_wait import (
    MIN_DECODES,
    InFlight,
    ServiceModel,
    ServiceRates,
    start_delay_s,
)
from kvern.routing.router import replica_candidate
from kvern.routing.shared_load import FleetShare

RATES = ServiceRates(fixed_s=0.0, s_per_token=0.001, decode_s=0.5)


def test_a_free_slot_means_no_wait() -> None:
    held = [InFlight(0, 1.0, 0.9)]

    assert start_delay_s(held, slots=2, rates=RATES) == 0.0


def test_full_slots_free_when_the_soonest_running_decode_is_expected_to_end() -> None:
    held = [InFlight(0, 1.0, 0.1), InFlight(0, 1.0, 0.3)]

    assert start_delay_s(held, slots=2, rates=RATES) == pytest.approx(0.2)


def test_a_request_still_prefilling_holds_its_slot_for_the_rest_of_its_prefill_and_a_decode() -> (
    None
):
    # 300 uncached tokens at 1 ms each, routed 0.1 s ago: 0.2 s of prefill left.
    held = [InFlight(300, 0.1, None)]

    assert start_delay_s(held, slots=1, rates=RATES) == pytest.approx(0.2 + 0.5)


def test_requests_queued_ahead_take_the_next_slots_first_in_routing_order() -> None:
    held = [
        InFlight(0, 1.0, 0.4),  # frees at 0.1
        InFlight(0, 1.0, 0.0),  # frees at 0.5
        InFlight(100, 0.05, None),  # queued: takes the slot at 0.1, holds it 0.1 + 0.5
        InFlight(200, 0.01, None),  # queued: takes the slot at 0.5, holds it 0.2 + 0.5
    ]

    # The slots free at 0.7 and 1.2: the new request starts at 0.7.
    assert start_delay_s(held, slots=2, rates=RATES) == pytest.approx(0.7)


def test_a_decode_past_its_expected_length_frees_its_slot_now_not_in_the_past() -> None:
    held = [InFlight(0, 2.0, 1.5)]

    assert start_delay_s(held, slots=1, rates=RATES) == 0.0


def test_nothing_is_priced_until_decodes_and_unqueued_prefills_were_seen() -> None:
    model = ServiceModel()
    for i in range(MIN_DECODES - 1):
        model.observe_decode(0.5)
        model.observe_prefill(100 * (i + 1), 0.01 + 0.001 * 100 * (i + 1))
    assert model.rates() is None

    model.observe_decode(0.5)
    model.observe_prefill(900, 0.91)

    rates = model.rates()
    assert rates is not None
    assert (rates.fixed_s, rates.s_per_token, rates.decode_s) == pytest.approx((0.01, 0.001, 0.5))


def test_the_decode_mean_follows_a_replica_that_slows_down() -> None:
    model = ServiceModel()
    for _ in range(40):
        model.observe_decode(0.2)
    for _ in range(60):
        model.observe_decode(1.0)
    for i in range(10):
        model.observe_prefill(100 * (i + 1), 0.001 * 100 * (i + 1))

    rates = model.rates()
    assert rates is not None
    assert rates.decode_s > 0.9


class _Clock:
    """Stands in for the ``time`` module inside ``kvern.routing.pool``."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def _one_slot_replica() -> Replica:
    entry = UpstreamEntry(name="a", url="http://127.0.0.1:1/v1", max_concurrency=1)
    return UpstreamPool([entry], HealthConfig()).replicas[0]


def _serve(replica: Replica, clock: _Clock, rid: str, tokens: int) -> None:
    """One request that finds the slot free: 1 ms per token of prefill, 0.4 s of decode."""
    replica.load.reserve(rid, tokens, now_s=clock.now)
    clock.now += 0.001 * tokens
    replica.load.first_byte(rid)
    clock.now += 0.4
    replica.load.end(rid)


@pytest.fixture
def taught(monkeypatch: pytest.MonkeyPatch) -> tuple[Replica, _Clock]:
    """A one-slot replica on a test clock that has served enough requests to price its queue."""
    clock = _Clock()
    monkeypatch.setattr(pool_module, "time", clock)
    replica = _one_slot_replica()
    for i in range(MIN_DECODES):
        _serve(replica, clock, f"w{i}", 100 * (i + 1))
    return replica, clock


def test_a_replica_learns_its_rates_from_its_own_requests_and_prices_its_queue_with_them(
    taught: tuple[Replica, _Clock],
) -> None:
    replica, clock = taught
    assert replica.load.slots == 1

    replica.load.reserve("running", 0, now_s=clock.now)
    replica.load.first_byte("running")
    clock.now += 0.1
    replica.load.reserve("queued", 200, now_s=clock.now)

    # The running decode ends in 0.3 s; the queued one then takes 0.2 s of
    # prefill and 0.4 s of decode: a request routed now starts in 0.9 s,
    # which is 900 prompt-token equivalents at this replica's 1 ms a token.
    candidate = replica_candidate(replica, decode_load_tokens=64, now_s=clock.now)
    assert candidate.wait == pytest.approx(900)


def test_a_request_that_queued_does_not_teach_the_prefill_rate(
    taught: tuple[Replica, _Clock],
) -> None:
    replica, clock = taught
    replica.load.reserve("first", 0, now_s=clock.now)
    replica.load.reserve("behind", 100, now_s=clock.now)  # no slot free: it queues
    replica.load.first_byte("first")
    clock.now += 0.4
    replica.load.end("first")
    clock.now += 0.1
    replica.load.first_byte("behind")  # 0.5 s after routing, for 100 tokens

    rates = replica.load.service.rates()
    assert rates is not None
    assert rates.s_per_token == pytest.approx(0.001)


def test_until_learned_a_full_replica_keeps_the_counting_estimate() -> None:
    replica = _one_slot_replica()
    replica.load.reserve("r0", 400, 0.0)

    # 400 prefill tokens pending, 1 + 1 - 1 = 1 request queued ahead of the slot.
    assert replica_candidate(replica, decode_load_tokens=100, now_s=0.0).wait == 400 + 100


def test_a_request_queued_behind_another_instances_requests_does_not_teach_the_prefill_rate(
    taught: tuple[Replica, _Clock],
) -> None:
    replica, clock = taught
    # This instance holds nothing there, but the fleet's share said the slot was taken.
    replica.load.reserve("behind", 100, now_s=clock.now, found_slot=False)
    clock.now += 0.5
    replica.load.first_byte("behind")

    rates = replica.load.service.rates()
    assert rates is not None
    assert rates.s_per_token == pytest.approx(0.001)


def test_requests_of_other_instances_are_priced_by_count_their_decodes_half_done(
    taught: tuple[Replica, _Clock],
) -> None:
    replica, clock = taught
    # Another instance has one request decoding there and one awaiting with 300 tokens.
    theirs = FleetShare(in_flight=2, prefill_tokens=300, decoding=1, demand=2.0)

    candidate = replica_candidate(replica, decode_load_tokens=64, now_s=clock.now, others=theirs)

    # Half of the 0.4 s decode left, then 0.3 s of prefill and 0.4 s of decode:
    # 0.9 s, 900 prompt-token equivalents at 1 ms a token.
    assert candidate.wait == pytest.approx(900)
    assert candidate.in_flight == 2
