"""The router: which upstream a request goes to, in what order to fail over, and why.

Why cache-aware decisions ask the brain: the longest prefix each upstream
holds comes from the token trie, which lives in the brain (its own process,
see :mod:`kvern.tracking.brain`). The question is an urgent job there
(tokenize incrementally, one walk down the trie), typically a millisecond for
a warm conversation; the choice itself (policy, load, reservation) is made
here, and the brain is then told where the request went, to mark it. The
event loop waits for the answer at most ``decision_timeout_ms``; past that,
or when the model's tokenizer is not loaded yet, the request goes by least
load, so routing never holds a request back for long.

One wait is on purpose: presence is marked when a request is routed, before
the upstream has computed anything, so a tenant's second session sent while
its first still prefills the system prompt finds the prefix "held" where it
is not yet. Sent at once it would compute the same tokens beside the first
(an engine reuses only what is computed when a request is scheduled); it
waits instead for the first one's first byte, which costs it about the time
its own prefill would have, and the prefill and the slot are saved.

Other policies decide on the event loop from load alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvern.config import RoutingConfig
from kvern.errors import ModelNotServed, NoHealthyUpstream
from kvern.routing.policies import Candidate, Choice, RoundRobin, cache_aware, least_load, session
from kvern.routing.pool import Load, LoadSnapshot, Replica, UpstreamPool
from kvern.routing.prefix_answer import PrefixAnswer
from kvern.routing.shared_load import FleetShare, SharedLoad

logger = logging.getLogger(__name__)


class RoutedRequest(Protocol):
    """What the router reads of a request in flight.

    :class:`kvern.tracking.records.RequestContext` is one; routing never imports it.
    """

    request_id: str  # kvern's id, the key of the load it reserves
    model: str | None  # the body's model


class PrefixOracle(Protocol):
    """Where cache-aware questions go: the brain (:class:`kvern.tracking.client.BrainClient`).

    A protocol so that routing, a floor below tracking, never imports it.
    ``ctx`` is the request the router was given, passed through unchanged.
    """

    def ask(self, ctx: Any, body: bytes) -> asyncio.Future[PrefixAnswer | None] | None: ...

    def commit(
        self, ctx: Any, upstream: str | None, oldest_awaiting_s: dict[str, float]
    ) -> None: ...


# Rough prompt tokens of a request whose prompt was not tokenized (bytes per token).
_BYTES_PER_TOKEN = 4
# How often a request waiting for a prefix in flight looks again (s).
_IN_FLIGHT_POLL_S = 0.002


@dataclass(slots=True)
class RouteState:
    """Where a request is, for load accounting and failover (kept on the proxy's side)."""

    choice: Choice
    replica: Replica  # the upstream being tried now
    prefill_tokens: int  # load reserved on it until the first byte
    attempts: int = 1


def replica_candidate(
    replica: Replica, decode_load_tokens: int, now_s: float, others: FleetShare | None = None
) -> Candidate:
    """A replica's load and the wait a new request would see there.

    Every request in flight counts ``decode_load_tokens`` (it holds a
    decode slot, or will once it leaves the replica's queue) plus its uncached
    prefill until its first byte. With ``max_concurrency`` slots known, a new
    request starts at once while a slot is free; otherwise it waits until a
    slot frees: played forward from what the replica's own requests taught
    (:mod:`kvern.routing.queue_wait`; the other instances' requests there by
    count), or, until they have, the work ahead of it shared by the slots.
    ``others``: what the other kvern instances have in flight there
    (``routing.shared_state``), added to this instance's own -- the replica
    serves them all.
    """
    snap = replica.load.snapshot()
    own_demand = demand = replica.load.demand(now_s)
    theirs: LoadSnapshot | None = None
    if others is not None:
        theirs = LoadSnapshot(others.in_flight, others.prefill_tokens, others.decoding)
        snap = snap.plus(theirs)
        demand += others.demand
    load = snap.tokens(decode_load_tokens)
    slots = replica.entry.max_concurrency
    learned = replica.load.queue_wait_tokens(theirs) if slots else None
    if learned is not None:
        wait = learned
    elif slots:
        queued = max(0, snap.in_flight + 1 - slots)
        wait = 0.0 if not queued else (snap.prefill_tokens + queued * decode_load_tokens) / slots
    else:
        wait = float(load)
    return Candidate(replica, load, snap.in_flight, wait, demand=demand, own_demand=own_demand)


def fleet_rate_scale(cands: Sequence[Candidate]) -> float:
    """How many times this instance's traffic the fleet's is (1 with no other instance).

    A prefix's request rate is counted in this instance's own trie, which sees
    only its share of the traffic: behind a round-robin client, one kvern of
    three sees a tenant's 6 requests a second as 2, and never finds it hot.
    The candidates' demand includes the other instances' (shared state), so
    fleet over own demand scales the rate back up.
    """
    own = sum(c.own_demand for c in cands)
    fleet = sum(c.demand for c in cands)
    return fleet / own if own > 0 and fleet > own else 1.0


class Router:
    """Picks upstreams from a pool with the configured policy."""

    def __init__(
        self,
        pool: UpstreamPool,
        config: RoutingConfig,
        policy: str,
        oracle: PrefixOracle,
        clock: Callable[[], float] = time.time,
        shared_load: SharedLoad | None = None,
    ) -> None:
        """``shared_load``: the other kvern instances' load (``routing.shared_state``)."""
        self.pool = pool
        self.config = config
        self.policy = policy
        self._oracle = oracle
        self._clock = clock
        self._rr = RoundRobin()
        self._shared_load = shared_load
        self._turn = 0
        self.num_decision_timeouts = 0
        # The last cache-aware decisions' waits (ms), for /health: what routing
        # adds before a request is sent.
        self.decision_ms: deque[float] = deque(maxlen=1024)
        # The last waits (ms) for a prefix the chosen upstream was still
        # computing (routing.in_flight_wait_ms), for /health.
        self.in_flight_wait_ms: deque[float] = deque(maxlen=1024)
        self.num_in_flight_waits = 0

    # -- candidates ------------------------------------------------------------

    def candidates(self, model: str | None) -> list[Candidate]:
        """Upstreams serving ``model`` whose circuit lets a request through now.

        Their load is the fleet's when other kvern instances share theirs: a
        local copy, never a round trip (stale: this instance's own, counted).
        """
        serving = self.pool.serving(model)
        if not serving:
            served = sorted({m for r in self.pool.replicas for m in r.entry.models})
            raise ModelNotServed(
                f"no upstream serves model {model!r} (configured: {', '.join(served)})",
                param="model",
            )
        decode = self.config.decode_load_tokens
        # Start each decision's scan one further along: ties (an idle pool)
        # then rotate instead of always landing on the first upstream.
        self._turn += 1
        shift = self._turn % len(serving)
        serving = serving[shift:] + serving[:shift]
        now, mono = self._clock(), time.monotonic()
        fleet = self._shared_load.others() if self._shared_load is not None else None
        cands = [
            replica_candidate(r, decode, now, fleet.get(r.name) if fleet else None)
            for r in serving
            if r.breaker.available(mono)
        ]
        if not cands:
            states = "; ".join(
                f"{r.name}: circuit {r.breaker.state} after {r.breaker.consecutive_failures} "
                f"failures ({r.breaker.last_error or 'no detail'})"
                for r in serving
            )
            raise NoHealthyUpstream(f"no healthy upstream for model {model!r}: {states}")
        return cands

    # -- deciding --------------------------------------------------------------

    async def route(
        self,
        ctx: RoutedRequest,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        raw: bytes,
    ) -> RouteState:
        """Choose the upstream for ``ctx`` and reserve its load; raises NoHealthyUpstream.

        A cache-aware choice asks the brain where the prompt's prefix is held
        and always tells it, once chosen, where the request went -- also when
        the answer came too late and the request went by load, so presence is
        only ever booked on the upstream that really got the request.
        """
        now = self._clock()
        estimate = max(1, len(raw) // _BYTES_PER_TOKEN)
        if self.policy == "cache_aware" and len(self.pool) > 1:
            pending = self._oracle.ask(ctx, raw)
            chosen: str | None = None
            try:
                state = await self._cache_aware(ctx, pending) if pending is not None else None
                if state is None:
                    choice = least_load(self.candidates(ctx.model), "no_prefix_info")
                    choice.replica.load.reserve(ctx.request_id, estimate, now)
                    state = RouteState(choice, choice.replica, estimate)
                chosen = state.replica.name
                return state
            finally:
                if pending is not None:
                    self._oracle.commit(ctx, chosen, self.pool.oldest_awaiting())
        cands = self.candidates(ctx.model)
        if self.policy == "round_robin":
            choice = self._rr.choose(cands)
        elif self.policy == "session":
            choice = session(cands, self._session_key(headers, body))
        else:
            choice = least_load(cands)
        choice.replica.load.reserve(ctx.request_id, estimate, now)
        return RouteState(choice, choice.replica, estimate)

    async def _cache_aware(
        self, ctx: RoutedRequest, pending: asyncio.Future[PrefixAnswer | None]
    ) -> RouteState | None:
        """Wait (bounded) for the brain's answer, then choose by it; None: go by load."""
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(
                asyncio.shield(pending), self.config.decision_timeout_ms / 1000.0
            )
        except TimeoutError:
            self.num_decision_timeouts += 1
            self.decision_ms.append(self.config.decision_timeout_ms)
            return None
        self.decision_ms.append((time.perf_counter() - started) * 1000.0)
        if answer is None:
            return None
        cands = self.candidates(ctx.model)
        for c in cands:
            c.cached = answer.cached.get(c.replica.name, 0)
            c.fill = answer.fill.get(c.replica.name, 0.0)
            c.assigned = answer.assigned.get(c.replica.name, 0)
        hot_per_s = answer.hot_per_s * fleet_rate_scale(cands)
        choice = cache_aware(cands, answer.num_tokens, self.config, hot_per_s)
        uncached = max(1, answer.num_tokens - choice.cached)
        load = choice.replica.load
        # Whether a slot was free counts the other instances' requests there
        # too: one that queued behind them must not teach the prefill rate.
        chosen_c = next(c for c in cands if c.replica is choice.replica)
        wait_s = self._in_flight_wait_s(chosen_c, choice, answer)
        # A request that waits first teaches neither its TTFT nor the prefill rate.
        load.reserve(
            ctx.request_id,
            uncached,
            self._clock(),
            choice.expected if wait_s is None else None,
            found_slot=not chosen_c.full and wait_s is None,
        )
        if choice.expected is not None:
            choice.expected_ms = load.ttft.expected_ms(choice.expected)
        if wait_s is not None:
            part = answer.in_flight[choice.replica.name]
            try:
                waited_ms = await self._await_in_flight(load, part.marked_s, wait_s)
            except BaseException:
                load.end(ctx.request_id)  # cancelled while waiting: nothing was sent
                raise
            self.num_in_flight_waits += 1
            self.in_flight_wait_ms.append(waited_ms)
            choice.reason += "_waited"
            if choice.expected_ms is not None:
                choice.expected_ms += waited_ms
        return RouteState(choice, choice.replica, uncached)

    def _in_flight_wait_s(
        self, chosen: Candidate, choice: Choice, answer: PrefixAnswer
    ) -> float | None:
        """How long to wait for the prefix the chosen upstream is still computing; None: send now.

        Sent now, the request would compute that prefix a second time beside
        the request computing it (an engine reuses only what is computed when
        the request is scheduled); waiting for that one's first byte costs
        about the same time and saves the work and the slot. Only where the
        request would start at once: on a queued upstream it waits in the
        queue anyway. At most twice that prefill's expected time (a request
        that stalls must not hold this one long) and ``in_flight_wait_ms``.
        """
        limit_s = self.config.in_flight_wait_ms / 1000.0
        part = answer.in_flight.get(choice.replica.name)
        if limit_s <= 0 or part is None or chosen.full:
            return None
        computing = choice.cached - part.settled
        if computing < self.config.min_match_tokens:
            return None
        load = choice.replica.load
        if not load.awaiting_routed_by(part.marked_s):
            return None
        rates = load.service.rates()
        fit = load.ttft.fit()
        per_token = rates.s_per_token if rates is not None else fit.s_per_token if fit else None
        if per_token is not None:
            limit_s = min(limit_s, 2.0 * computing * per_token)
        return limit_s if limit_s > 0 else None

    async def _await_in_flight(self, load: Load, marked_s: float, limit_s: float) -> float:
        """Wait until no request routed by ``marked_s`` awaits its first byte; the ms waited.

        Polled: first bytes are counted on the event loop and the tracking
        thread alike, and a few milliseconds of polling for the rare request
        that waits costs less than a wake-up on every first byte.
        """
        started = time.monotonic()
        deadline = started + limit_s
        while load.awaiting_routed_by(marked_s) and time.monotonic() < deadline:
            await asyncio.sleep(_IN_FLIGHT_POLL_S)
        return (time.monotonic() - started) * 1000.0

    def _session_key(self, headers: Mapping[str, str], body: dict[str, Any] | None) -> str | None:
        key = headers.get(self.config.session_header)
        if key:
            return key
        user = body.get("user") if isinstance(body, dict) else None
        return user if isinstance(user, str) and user else None

    # -- failover ----------------------------------------------------------------

    def next_attempt(self, state: RouteState, tried: set[str]) -> RouteState | None:
        """The next upstream to try after a failure before any byte was relayed."""
        if state.attempts >= self.config.max_attempts:
            return None
        now = time.monotonic()
        for replica in state.choice.fallbacks:
            if replica.name in tried or not replica.breaker.available(now):
                continue
            return RouteState(state.choice, replica, state.prefill_tokens, state.attempts + 1)
        return None
