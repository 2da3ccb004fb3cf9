"""A request whose prefix its upstream still computes waits for it instead of computing it too.

The router is real (a real :class:`UpstreamPool`, the cache_aware policy, load
accounting); only the brain's answer is given by hand, as the brain would
send it: the tenant's system prompt marked on ``a`` by a request routed
there moments ago that has no first byte yet. No request is sent anywhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvern.config import HealthConfig, RoutingConfig, UpstreamEntry
from kvern.routing.pool import UpstreamPool
from kvern.routing.prefix_answer import InFlightPrefix, PrefixAnswer
from kvern.routing.router import Router

NOW_S = 1_000.0  # the router's wall clock, fixed


@dataclass
class Ctx:
    request_id: str
    model: str | None = "m"


@dataclass
class Oracle:
    """Answers every question with ``answer``; records where each request went."""

    answer: PrefixAnswer
    commits: list[tuple[str, str | None]] = field(default_factory=list)

    def ask(self, ctx: Any, body: bytes) -> asyncio.Future[PrefixAnswer | None]:
        fut: asyncio.Future[PrefixAnswer | None] = asyncio.get_running_loop().create_future()
        fut.set_result(self.answer)
        return fut

    def commit(self, ctx: Any, upstream: str | None, oldest_awaiting_s: dict[str, float]) -> None:
        self.commits.append((ctx.request_id, upstream))


def pool(slots: int = 4) -> UpstreamPool:
    entries = [
        UpstreamEntry(name=n, url="http://127.0.0.1:1/v1", max_concurrency=slots) for n in "ab"
    ]
    return UpstreamPool(entries, HealthConfig())


def answer(marked_s: float = NOW_S - 0.2) -> PrefixAnswer:
    """A 1,040-token prompt: its first 1,024 tokens sent to ``a`` at ``marked_s``, not computed."""
    return PrefixAnswer(
        1_040,
        {"a": 1_024, "b": 0},
        {"a": 0.1, "b": 0.1},
        in_flight={"a": InFlightPrefix(0, marked_s, 1_024)},
    )


def router(p: UpstreamPool, oracle: Oracle, wait_ms: float = 1_000.0) -> Router:
    config = RoutingConfig(in_flight_wait_ms=wait_ms)
    return Router(p, config, "cache_aware", oracle, clock=lambda: NOW_S)


async def test_a_request_waits_for_the_first_byte_of_the_one_computing_its_prefix() -> None:
    p = pool()
    a = p.replicas[0].load
    a.reserve("first", 1_024, NOW_S - 0.3)  # the tenant's first session, prefilling on a
    r = router(p, Oracle(answer()))
    asyncio.get_running_loop().call_later(0.08, a.first_byte, "first")

    started = time.monotonic()
    state = await r.route(Ctx("second"), None, {}, b"{}")

    assert time.monotonic() - started >= 0.075
    assert (state.replica.name, state.choice.reason) == ("a", "prefix_waited")
    assert state.choice.cached == 1_024
    assert r.num_in_flight_waits == 1 and r.in_flight_wait_ms[0] >= 75


async def test_no_wait_once_every_request_routed_by_the_mark_has_its_first_byte() -> None:
    p = pool()
    a = p.replicas[0].load
    a.reserve("first", 1_024, NOW_S - 0.3)
    a.first_byte("first")
    a.reserve("later", 500, NOW_S - 0.1)  # routed after the mark: not the prefix's maker
    r = router(p, Oracle(answer(marked_s=NOW_S - 0.2)))

    state = await r.route(Ctx("second"), None, {}, b"{}")

    assert (state.replica.name, state.choice.reason) == ("a", "prefix")
    assert r.num_in_flight_waits == 0


async def test_a_request_that_would_queue_there_anyway_does_not_wait() -> None:
    p = pool(slots=1)
    a = p.replicas[0].load
    a.reserve("first", 16, NOW_S - 0.3)  # a's only slot is taken
    r = router(p, Oracle(answer()))

    state = await r.route(Ctx("second"), None, {}, b"{}")

    assert state.choice.reason in {"prefix", "prefix_overloaded"}
    assert r.num_in_flight_waits == 0


async def test_the_wait_ends_at_its_limit_when_the_first_byte_never_comes() -> None:
    p = pool()
    p.replicas[0].load.reserve("stalled", 1_024, NOW_S - 0.3)
    r = router(p, Oracle(answer()), wait_ms=60.0)

    started = time.monotonic()
    state = await r.route(Ctx("second"), None, {}, b"{}")

    assert 0.055 <= time.monotonic() - started < 1.0
    assert (state.replica.name, state.choice.reason) == ("a", "prefix_waited")


async def test_no_wait_when_waiting_is_switched_off() -> None:
    p = pool()
    p.replicas[0].load.reserve("first", 1_024, NOW_S - 0.3)
    r = router(p, Oracle(answer()), wait_ms=0.0)

    state = await r.route(Ctx("second"), None, {}, b"{}")

    assert state.choice.reason == "prefix" and r.num_in_flight_waits == 0


async def test_a_request_cancelled_while_waiting_releases_its_load_and_is_booked_nowhere() -> None:
    p = pool()
    a = p.replicas[0].load
    a.reserve("first", 1_024, NOW_S - 0.3)
    oracle = Oracle(answer())
    r = router(p, oracle)

    task = asyncio.ensure_future(r.route(Ctx("second"), None, {}, b"{}"))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert a.snapshot().in_flight == 1  # only "first"
    assert oracle.commits == [("second", None)]
