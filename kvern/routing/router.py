"""The router: which upstream a request goes to, in what order to fail over, and why.

Why cache-aware decisions run on the tracking thread: the longest prefix each
upstream holds comes from the token trie, and only the tracking thread
touches tries. The decision is an urgent job there (tokenize incrementally,
one walk down the trie, pick, reserve load, mark the prefix on the chosen
upstream), typically well under a millisecond for a warm conversation. The
event loop waits for it at most ``decision_timeout_ms``; past that, or when
the model's tokenizer is not loaded yet, the request goes by least load, so
routing never holds a request back for long.

Other policies decide on the event loop from load alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kvern.config import RoutingConfig
from kvern.errors import ModelNotServed, NoHealthyUpstream
from kvern.routing.policies import Candidate, Choice, RoundRobin, cache_aware, least_load, session
from kvern.routing.pool import Replica, UpstreamPool
from kvern.routing.presence import PresenceMatch

logger = logging.getLogger(__name__)



class RoutedRequest(Protocol):
    """What the router reads of a request in flight.

    :class:`kvern.tracking.records.RequestContext` is one; routing never imports it.
    """

    request_id: str  # kvern's id, the key of the load it reserves
    model: str | None  # the body's model
    upstream: str  # where the request went, set by the caller once routed


Decide = Callable[[PresenceMatch, float], Choice]


class PrefixOracle(Protocol):
    """Where cache-aware decisions run: beside the tries (:class:`kvern.tracking.tracker.Tracker`).

    A protocol so that routing, a floor below tracking, never imports it.
    ``ctx`` is the request the router was given, passed through unchanged.
    """

    def route(
        self, ctx: Any, body: dict[str, Any] | None, decide: Decide
    ) -> asyncio.Future[Any] | None: ...


# Rough prompt tokens of a request whose prompt was not tokenized (bytes per token).
_BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class RouteState:
    """Where a request is, for load accounting and failover (kept on the proxy's side)."""

    choice: Choice
    replica: Replica  # the upstream being tried now
    prefill_tokens: int  # load reserved on it until the first byte
    attempts: int = 1


def replica_candidate(replica: Replica, decode_load_tokens: int, now_s: float) -> Candidate:
    """A replica's load and the wait a new request would see there.

    Every request in flight counts ``decode_load_tokens`` (it holds a
    decode slot, or will once it leaves the replica's queue) plus its uncached
    prefill until its first byte. With ``max_concurrency`` slots known, a new
    request starts at once while a slot is free; otherwise it waits for the
    work ahead of it, shared by the slots.
    """
    snap = replica.load.snapshot()
    load = snap.tokens(decode_load_tokens)
    slots = replica.entry.max_concurrency
    if slots:
        queued = max(0, snap.in_flight + 1 - slots)
        wait = 0.0 if not queued else (snap.prefill_tokens + queued * decode_load_tokens) / slots
    else:
        wait = float(load)
    return Candidate(replica, load, snap.in_flight, wait, demand=replica.load.demand(now_s))


class Router:
    """Picks upstreams from a pool with the configured policy."""

    def __init__(
        self,
        pool: UpstreamPool,
        config: RoutingConfig,
        policy: str,
        tracker: PrefixOracle,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.config = config
        self.policy = policy
        self._tracker = tracker
        self._clock = clock
        self._rr = RoundRobin()
        self._turn = 0
        self.num_decision_timeouts = 0
        # The last cache-aware decisions' waits (ms), for /health: what routing
        # adds before a request is sent.
        self.decision_ms: deque[float] = deque(maxlen=1024)

    # -- candidates ------------------------------------------------------------

    def candidates(self, model: str | None) -> list[Candidate]:
        """Upstreams serving ``model`` whose circuit lets a request through now."""
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
        cands = [replica_candidate(r, decode, now) for r in serving if r.breaker.available(mono)]
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
        body_bytes: int,
    ) -> RouteState:
        """Choose the upstream for ``ctx`` and reserve its load; raises NoHealthyUpstream."""
        now = self._clock()
        estimate = max(1, body_bytes // _BYTES_PER_TOKEN)
        if self.policy == "cache_aware" and len(self.pool) > 1:
            state = await self._cache_aware(ctx, body, estimate)
            if state is not None:
                return state
            choice = least_load(self.candidates(ctx.model), "no_prefix_info")
        else:
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
        self, ctx: RoutedRequest, body: dict[str, Any] | None, estimate: int
    ) -> RouteState | None:
        reserved: list[int] = []

        def decide(match: PresenceMatch, now: float) -> Choice:
            cands = self.candidates(ctx.model)
            for c in cands:
                c.cached = match.cached(c.replica.cache)
                c.fill = match.fill.get(c.replica.name, 0.0)
            choice = cache_aware(cands, match.num_tokens, self.config)
            uncached = max(1, match.num_tokens - choice.cached)
            choice.replica.load.reserve(ctx.request_id, uncached, now)
            reserved.append(uncached)
            return choice

        started = time.perf_counter()
        pending = self._tracker.route(ctx, body, decide)
        if pending is None:
            return None
        try:
            choice = await asyncio.wait_for(
                asyncio.shield(pending), self.config.decision_timeout_ms / 1000.0
            )
        except TimeoutError:
            self.num_decision_timeouts += 1
            self.decision_ms.append(self.config.decision_timeout_ms)
            pending.add_done_callback(lambda f: self._release_late(ctx, f, reserved))
            return None
        self.decision_ms.append((time.perf_counter() - started) * 1000.0)
        if choice is None:
            return None
        return RouteState(choice, choice.replica, reserved[0])

    @staticmethod
    def _release_late(ctx: RoutedRequest, done: asyncio.Future[Any], reserved: list[int]) -> None:
        """A decision that came after the timeout reserved load the request never used."""
        if done.cancelled() or done.exception() is not None:
            return
        choice = done.result()
        # The same upstream as the fallback picked: one entry, still in use.
        if choice is not None and reserved and choice.replica.name != ctx.upstream:
            choice.replica.load.end(ctx.request_id)

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
