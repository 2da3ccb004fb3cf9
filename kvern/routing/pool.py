"""The upstreams kvern routes among: each one's address, load and health.

Why load in tokens: what delays a request on a replica is the prefill work
queued ahead of it (tokens not yet cached there) and the decodes running
beside it, not how many requests it holds. A request adds its uncached prompt
tokens from the moment it is routed until its first byte comes back, then
counts as one running decode (``decode_load_tokens``) until it ends.

Why a lock in :class:`Load`: cache-aware decisions are made on the tracking
thread (where the trie is) and must reserve load at once, so two requests
routed back to back see each other; the event loop releases it. Every change
is a few integer updates under the lock.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from dataclasses import dataclass, field

from kvern.config import HealthConfig, UpstreamEntry
from kvern.routing.breaker import Breaker
from kvern.routing.presence_match import UpstreamCache
from kvern.routing.queue_wait import (
    InFlight,
    ServiceModel,
    ServiceRates,
    elsewhere,
    start_delay_s,
)
from kvern.routing.ttft import TtftModel
from kvern.upstream.client import Upstream

# Half-life of the decayed count of requests routed to a replica (s).
DEMAND_HALF_LIFE_S = 30.0


@dataclass(slots=True)
class _InFlight:
    """One request a replica holds, from its routing to its end."""

    prefill_tokens: int  # its uncached prompt tokens, counted until its first byte
    routed_s: float  # when it was routed (the router's clock)
    expected: float | None  # the router's cost for it (token-equivalents), to teach the TTFT line
    routed_mono: float  # the same moment on a monotonic clock, to time its first byte
    found_slot: bool = False  # a running slot was free when it was routed: no queue wait
    decoding: bool = False  # past its first byte
    first_byte_mono: float = 0.0


@dataclass(slots=True)
class LoadSnapshot:
    in_flight: int
    prefill_tokens: int
    decoding: int

    def tokens(self, decode_load_tokens: int) -> int:
        """The load in prompt-token equivalents: uncached prefill, plus one decode per request.

        Every request in flight counts, queued ones too: each holds a decode
        slot, or will once it leaves the replica's queue.
        """
        return self.prefill_tokens + decode_load_tokens * self.in_flight

    def plus(self, other: LoadSnapshot) -> LoadSnapshot:
        """Both loads on the same replica (this instance's and the others')."""
        return LoadSnapshot(
            self.in_flight + other.in_flight,
            self.prefill_tokens + other.prefill_tokens,
            self.decoding + other.decoding,
        )


class Load:
    """A replica's work in flight, shared by the event loop and the tracking thread.

    Kept per request id, so every transition is idempotent: a request ended
    twice (a late routing decision released after a timeout, a relay's
    ``finally``) is counted once.
    """

    def __init__(self, ttft: TtftModel | None = None, slots: int = 0) -> None:
        # Taught each request's expected cost and real time to first byte.
        self.ttft = ttft if ttft is not None else TtftModel()
        # The replica's running slots (max_concurrency; 0: unknown), and what
        # its requests take there, to price its queue (kvern.routing.queue_wait).
        self.slots = slots
        self.service = ServiceModel()
        self._lock = threading.Lock()
        self.in_flight = 0  # requests sent and not yet ended
        self.prefill_tokens = 0  # uncached prompt tokens of requests awaiting their first byte
        self.decoding = 0  # requests past their first byte
        self._requests: dict[str, _InFlight] = {}
        # Requests routed here, decayed with a DEMAND_HALF_LIFE_S half-life:
        # the demand of the prefixes this replica holds, which a snapshot of
        # what is in flight right now does not show.
        self._demand = 0.0
        self._demand_at = 0.0

    def snapshot(self) -> LoadSnapshot:
        with self._lock:
            return LoadSnapshot(self.in_flight, self.prefill_tokens, self.decoding)

    def reserve(
        self,
        request_id: str,
        prefill_tokens: int,
        now_s: float,
        expected: float | None = None,
        found_slot: bool | None = None,
    ) -> None:
        """``request_id`` was routed here with this many uncached prompt tokens.

        ``expected``: the router's cost for it here (wait + prefill, in
        token-equivalents); its first byte then teaches :attr:`ttft`.
        ``found_slot``: a running slot was free for it (None: judged by this
        instance's own requests here); its first byte then teaches the
        prefill rate.
        """
        with self._lock:
            if request_id in self._requests:
                return
            self._requests[request_id] = _InFlight(
                prefill_tokens,
                now_s,
                expected,
                time.monotonic(),
                found_slot=(
                    self.slots > 0 and self.in_flight < self.slots
                    if found_slot is None
                    else self.slots > 0 and found_slot
                ),
            )
            self.in_flight += 1
            self.prefill_tokens += prefill_tokens
            self._demand = self._decayed(now_s) + 1.0
            self._demand_at = max(now_s, self._demand_at)

    def _decayed(self, now_s: float) -> float:
        elapsed = max(0.0, now_s - self._demand_at)
        return float(self._demand * 0.5 ** (elapsed / DEMAND_HALF_LIFE_S))

    def demand(self, now_s: float) -> float:
        """Requests routed here recently (decayed count)."""
        with self._lock:
            return self._decayed(now_s)

    def first_byte(self, request_id: str) -> None:
        """Its prefill is done: from now on it counts as one running decode.

        When it was reserved with an expected cost, the real time since then
        teaches the TTFT model (a monotonic clock: wall time may jump).
        """
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is None or entry.decoding:
                return
            self.prefill_tokens -= entry.prefill_tokens
            entry.decoding = True
            entry.first_byte_mono = time.monotonic()
            self.decoding += 1
        ttft_s = entry.first_byte_mono - entry.routed_mono
        if entry.expected is not None:
            self.ttft.observe(entry.expected, ttft_s)
        if entry.found_slot:
            self.service.observe_prefill(entry.prefill_tokens, ttft_s)

    def end(self, request_id: str) -> None:
        """The request ended (answered, failed or abandoned), at any stage."""
        with self._lock:
            entry = self._requests.pop(request_id, None)
            if entry is None:
                return
            if entry.decoding:
                self.decoding -= 1
            else:
                self.prefill_tokens -= entry.prefill_tokens
            self.in_flight -= 1
        if entry.decoding:
            self.service.observe_decode(time.monotonic() - entry.first_byte_mono)

    def queue_wait_tokens(self, others: LoadSnapshot | None = None) -> float | None:
        """Prompt-token equivalents a request routed now waits for a running slot.

        The wait is played forward in seconds from the replica's learned
        rates and converted at its learned prefill rate; None until they are
        learned or when its slots (``max_concurrency``) are unknown.
        ``others``: what other kvern instances hold there (counts only).
        """
        rates = self.service.rates()
        wait_s = None if rates is None else self._wait_s(rates, others)
        if wait_s is None or rates is None:
            return None
        return wait_s / rates.s_per_token

    def _wait_s(self, rates: ServiceRates, others: LoadSnapshot | None) -> float | None:
        if self.slots < 1:
            return None
        now = time.monotonic()
        with self._lock:
            held = [
                InFlight(
                    e.prefill_tokens,
                    now - e.routed_mono,
                    now - e.first_byte_mono if e.decoding else None,
                )
                for e in self._requests.values()
            ]
        if others is not None:
            awaiting = others.in_flight - others.decoding
            held += elsewhere(others.decoding, awaiting, others.prefill_tokens, rates)
        return start_delay_s(held, self.slots, rates)

    def awaiting_routed_by(self, when_s: float) -> bool:
        """Whether a request routed here by ``when_s`` (wall clock) still awaits its first byte."""
        with self._lock:
            return any(not e.decoding and e.routed_s <= when_s for e in self._requests.values())

    def oldest_awaiting(self) -> float:
        """When the oldest request still prefilling here was routed (inf: none)."""
        with self._lock:
            return min(
                (e.routed_s for e in self._requests.values() if not e.decoding),
                default=float("inf"),
            )


@dataclass(slots=True)
class ReplicaCounters:
    """Per-upstream totals for /health (analytics keeps the per-request rows)."""

    requests: int = 0  # attempts sent
    failures: int = 0  # attempts that failed before relaying anything
    failovers: int = 0  # of those, retried on another upstream
    stale_retries: int = 0  # sent again after it dropped a reused connection unanswered
    checks_ok: int = 0
    checks_failed: int = 0
    last_check_ms: float | None = None
    last_check_error: str | None = None


@dataclass(slots=True)
class Replica:
    """One upstream with its live state."""

    index: int
    entry: UpstreamEntry
    upstream: Upstream
    breaker: Breaker
    load: Load = field(default_factory=Load)
    counters: ReplicaCounters = field(default_factory=ReplicaCounters)
    # What its prefix cache holds, as configured (built once: read per decision).
    cache: UpstreamCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = UpstreamCache(self.name, self.entry.kv_capacity_tokens, self.entry.block_size)
        self.load.slots = self.entry.max_concurrency

    @property
    def name(self) -> str:
        return self.entry.name

    def serves(self, model: str | None) -> bool:
        if model is None:
            return True
        return any(model == p or fnmatch.fnmatchcase(model, p) for p in self.entry.models)


class UpstreamPool:
    """The configured upstreams, in config order."""

    def __init__(self, entries: list[UpstreamEntry], health: HealthConfig) -> None:
        self.replicas = [
            Replica(
                index=i,
                entry=e,
                upstream=Upstream.at(e.url, e.name),
                breaker=Breaker(health.failure_threshold, health.open_s, opens=len(entries) > 1),
            )
            for i, e in enumerate(entries)
        ]
        self.by_name = {r.name: r for r in self.replicas}

    def __len__(self) -> int:
        return len(self.replicas)

    def serving(self, model: str | None) -> list[Replica]:
        return [r for r in self.replicas if r.serves(model)]

    def oldest_awaiting(self) -> dict[str, float]:
        """Per upstream, when its oldest request still prefilling was routed (several only).

        The brain trusts only presence marks older than this as proof (see
        :meth:`kvern.routing.presence_match.PresenceMatch.trusted_cached`).
        """
        if len(self.replicas) < 2:
            return {}
        return {r.name: r.load.oldest_awaiting() for r in self.replicas}

    def caches(self) -> list[UpstreamCache]:
        return [r.cache for r in self.replicas]
