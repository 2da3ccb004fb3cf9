"""Breaker: closed -> open after consecutive failures, a timed half-open trial, back to closed.

Time is passed in by hand (``now_s``); the breaker has no clock of its own.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvern.routing.breaker import Breaker

OPEN_S = 10.0


def make_breaker(threshold: int = 3) -> Breaker:
    return Breaker(failure_threshold=threshold, open_s=OPEN_S)


def opened_at(now_s: float, threshold: int = 3) -> Breaker:
    """A breaker that opened at ``now_s``."""
    breaker = make_breaker(threshold)
    for _ in range(threshold):
        breaker.failure("refused", now_s)
    assert breaker.state == "open"
    return breaker


def test_breaker_opens_on_the_threshold_failure_and_says_so_once() -> None:
    breaker = make_breaker(threshold=3)

    opened = [breaker.failure(f"refused {i}", float(i)) for i in range(6)]

    assert opened == [False, False, True, False, False, False]
    assert breaker.state == "open"
    assert breaker.times_opened == 1
    assert breaker.consecutive_failures == 6
    assert breaker.last_error == "refused 5"


def test_breaker_with_threshold_one_opens_on_the_first_failure() -> None:
    breaker = make_breaker(threshold=1)

    assert breaker.failure("refused", 0.0) is True
    assert breaker.state == "open"


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = make_breaker(threshold=3)
    breaker.failure("refused", 0.0)
    breaker.failure("refused", 1.0)

    breaker.success()
    opened = [breaker.failure("refused", 2.0), breaker.failure("refused", 3.0)]

    assert opened == [False, False]
    assert breaker.state == "closed"
    assert breaker.acquire(4.0)


def test_closed_breaker_lets_every_request_through() -> None:
    breaker = make_breaker()
    breaker.failure("refused", 0.0)

    assert all(breaker.acquire(float(t)) for t in range(5))
    assert breaker.available(5.0)


def test_open_breaker_rejects_until_open_s_has_passed() -> None:
    breaker = opened_at(100.0)

    assert not breaker.available(100.0 + OPEN_S - 0.001)
    assert not breaker.acquire(100.0 + OPEN_S - 0.001)
    assert breaker.state == "open"
    assert breaker.available(100.0 + OPEN_S)


def test_open_breaker_past_open_s_lets_exactly_one_trial_through() -> None:
    breaker = opened_at(100.0)
    later = 100.0 + OPEN_S

    assert breaker.acquire(later)
    assert breaker.state == "half_open"
    assert not breaker.available(later)
    assert not breaker.acquire(later)
    assert not breaker.acquire(later + 60.0)


def test_available_does_not_take_the_trial() -> None:
    breaker = opened_at(100.0)
    later = 100.0 + OPEN_S

    assert breaker.available(later)
    assert breaker.available(later)
    assert breaker.state == "open"
    assert breaker.acquire(later)


def test_failed_trial_reopens_for_a_full_open_s() -> None:
    breaker = opened_at(100.0)
    breaker.acquire(110.0)

    assert breaker.failure("still refused", 111.0) is True

    assert breaker.state == "open"
    assert breaker.times_opened == 2
    assert not breaker.acquire(111.0 + OPEN_S - 0.001)
    assert breaker.acquire(111.0 + OPEN_S)


def test_successful_trial_closes_the_circuit() -> None:
    breaker = opened_at(100.0)
    breaker.acquire(110.0)

    breaker.success()

    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0
    assert all(breaker.acquire(110.0) for _ in range(3))
    # Closed again: it takes the full threshold to open it once more.
    assert [breaker.failure("refused", 120.0) for _ in range(3)] == [False, False, True]


def test_failures_while_open_push_the_trial_back() -> None:
    breaker = opened_at(100.0)

    assert breaker.failure("health check failed", 105.0) is False

    assert not breaker.acquire(100.0 + OPEN_S)
    assert breaker.acquire(105.0 + OPEN_S)
    assert breaker.times_opened == 1


def test_success_while_open_closes_the_circuit() -> None:
    # A health check (or a request sent before the circuit opened) came back fine.
    breaker = opened_at(100.0)

    breaker.success()

    assert breaker.state == "closed"
    assert breaker.acquire(100.0)


class BreakerMachine(RuleBasedStateMachine):
    """Random acquires, successes, failures and waits against a reference of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker = make_breaker(threshold=3)
        self.now_s = 0.0
        self.failures = 0  # consecutive, since the last success
        self.opened_s: float | None = None  # when the circuit last (re)opened; None: closed
        self.trial = False  # a half-open trial is out

    @rule(wait_s=st.sampled_from([0.0, 1.0, OPEN_S / 2, OPEN_S]))
    def acquire(self, wait_s: float) -> None:
        self.now_s += wait_s
        granted = self.breaker.acquire(self.now_s)
        if self.opened_s is None:
            assert granted
        elif self.trial or self.now_s - self.opened_s < OPEN_S:
            assert not granted
        else:
            assert granted
            self.trial = True

    @rule()
    def success(self) -> None:
        self.breaker.success()
        self.failures, self.opened_s, self.trial = 0, None, False

    @rule()
    def failure(self) -> None:
        self.failures += 1
        opened = self.breaker.failure("refused", self.now_s)
        expect_open = (self.opened_s is None and self.failures >= 3) or self.trial
        assert opened == expect_open
        if opened or self.opened_s is not None:
            self.opened_s = self.now_s
        self.trial = False

    @invariant()
    def state_matches_the_reference(self) -> None:
        if self.opened_s is None:
            assert self.breaker.state == "closed"
        elif self.trial:
            assert self.breaker.state == "half_open"
        else:
            assert self.breaker.state == "open"
        assert self.breaker.consecutive_failures == self.failures


BreakerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_breaker_follows_its_state_machine_in_any_sequence = BreakerMachine.TestCase


def test_a_breaker_that_may_not_open_counts_failures_and_keeps_letting_requests_through() -> None:
    breaker = Breaker(failure_threshold=2, open_s=10.0, opens=False)  # a lone upstream's

    opened = [breaker.failure("refused", now_s=float(t)) for t in range(5)]

    assert opened == [False] * 5
    assert (breaker.state, breaker.consecutive_failures, breaker.last_error) == (
        "closed",
        5,
        "refused",
    )
    assert breaker.available(5.0) and breaker.acquire(5.0) and breaker.acquire(5.0)
