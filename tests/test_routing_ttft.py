"""The router's expected time to first token in ms, learned from each replica's first bytes."""

from __future__ import annotations

import random
import time

import pytest

from kvern.routing.pool import Load
from kvern.routing.ttft import MIN_SAMPLES, TtftModel


def test_the_model_recovers_a_replicas_fixed_cost_and_time_per_token() -> None:
    rng = random.Random(3)
    model = TtftModel()
    for _ in range(200):
        tokens = rng.uniform(0, 4_000)
        model.observe(tokens, 0.012 + 0.0002 * tokens + rng.gauss(0, 0.002))

    fit = model.fit()

    assert fit is not None
    assert fit.fixed_s == pytest.approx(0.012, abs=0.002)
    assert fit.s_per_token == pytest.approx(0.0002, rel=0.03)
    assert model.expected_ms(1_000) == pytest.approx(212, rel=0.03)


def test_the_model_says_nothing_until_it_has_seen_enough_first_bytes() -> None:
    model = TtftModel()
    for _ in range(MIN_SAMPLES - 1):
        model.observe(100, 0.05)
    assert model.expected_ms(100) is None
    model.observe(100, 0.05)
    # Every request cost the same: the line goes through the origin and that point.
    assert model.expected_ms(100) == pytest.approx(50.0)
    assert model.expected_ms(200) == pytest.approx(100.0)


def test_the_model_follows_a_replica_that_slows_down() -> None:
    model = TtftModel()
    for i in range(100):
        model.observe(500 + i % 7 * 100, 0.0001 * (500 + i % 7 * 100))
    for i in range(150):
        model.observe(500 + i % 7 * 100, 0.0004 * (500 + i % 7 * 100))

    assert model.expected_ms(1_000) == pytest.approx(400, rel=0.1)


def test_a_negative_fixed_cost_is_never_fitted() -> None:
    model = TtftModel()
    for tokens in (1_000, 2_000, 3_000) * 4:
        model.observe(tokens, max(0.0, 0.001 * tokens - 0.5))

    fit = model.fit()

    assert fit is not None and fit.fixed_s >= 0 and fit.s_per_token >= 0


def test_a_first_byte_teaches_the_replicas_model_only_when_the_router_expected_something() -> None:
    load = Load()
    for i in range(MIN_SAMPLES):
        load.reserve(f"r{i}", 100, 0.0, expected=100.0)
        load.reserve(f"x{i}", 100, 0.0)  # no expectation (another policy): not learned from
    time.sleep(0.02)
    for i in range(MIN_SAMPLES):
        load.first_byte(f"r{i}")
        load.first_byte(f"x{i}")
        load.first_byte(f"r{i}")  # twice: counted once

    fit = load.ttft.fit()

    assert fit is not None and fit.samples == MIN_SAMPLES
    assert fit.ms(100) >= 20.0
