"""When a new request would start at a replica whose running slots are all taken.

Why learn it: ``cache_aware`` weighs a holder's queue against recomputing a
prefix elsewhere, so the queue must be priced in the same unit as prefill and
priced right. Counting each queued request as a fixed ``decode_load_tokens``
knows neither how long a decode takes at that replica nor how far along the
running ones are: on the routing bench (16-token answers at 20 ms a token,
prefill at 200 us a token) one slot turn is about 1,600 token-equivalents,
and the count said 64. So each replica learns two things from its own
traffic:

- how long a request decodes, first byte to end (an exponentially weighted
  mean over about the last 20 requests);
- how long prefill takes per uncached token: a :class:`TtftModel` fitted only
  on requests that found a slot free when they were routed, so no queue wait
  hides in the line.

With both, the requests in flight are played forward in routing order over
``max_concurrency`` slots (FIFO, as vLLM's and llama-server's schedulers take
waiting requests): a running decode frees its slot when its expected decode
time has passed since its first byte; a request not yet answered needs its
prefill and a decode. The new request starts when the next slot frees after
those ahead of it. Requests other kvern instances hold there (shared state)
are known only by count: their decodes are taken half done. Until a replica
has taught both (a few requests), the caller keeps the counting estimate.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvern.routing.ttft import TtftModel

# Decodes observed before their mean is trusted.
MIN_DECODES = 8
# Weight of the newest decode in the running mean (about the last 20 count).
DECODE_ALPHA = 0.05


@dataclass(frozen=True, slots=True)
class ServiceRates:
    """What one replica's requests cost there, in seconds."""

    fixed_s: float  # per request, before its prefill (network, scheduling)
    s_per_token: float  # prefill, per uncached prompt token
    decode_s: float  # first byte to end

    def prefill_s(self, tokens: int) -> float:
        return self.fixed_s + self.s_per_token * max(0, tokens)


@dataclass(frozen=True, slots=True)
class InFlight:
    """One request a replica holds, as the estimate sees it (oldest routed first)."""

    prefill_tokens: int  # uncached prompt tokens
    since_routed_s: float
    since_first_byte_s: float | None  # None: still queued or prefilling


def elsewhere(
    decoding: int, awaiting: int, prefill_tokens: int, rates: ServiceRates
) -> list[InFlight]:
    """Requests other kvern instances hold at the replica, whose progress this one cannot see.

    Each decode is taken half done (its expected remaining time on average);
    the ones awaiting a first byte share their prefill tokens and wait behind
    this instance's own.
    """
    half = rates.decode_s / 2
    each = prefill_tokens // awaiting if awaiting > 0 else 0
    return [InFlight(0, half, half) for _ in range(max(0, decoding))] + [
        InFlight(each, 0.0, None) for _ in range(max(0, awaiting))
    ]


class ServiceModel:
    """One replica's learned decode time and prefill rate; safe across threads."""

    def __init__(self) -> None:
        self.prefill = TtftModel()
        self._lock = threading.Lock()
        self._decode_s = 0.0
        self._decodes = 0

    def observe_prefill(self, tokens: int, ttft_s: float) -> None:
        """A request that started at once: its time to first byte was its prefill alone."""
        self.prefill.observe(float(tokens), ttft_s)

    def observe_decode(self, seconds: float) -> None:
        if seconds < 0:
            return
        with self._lock:
            self._decodes += 1
            if self._decodes == 1:
                self._decode_s = seconds
            else:
                # A plain mean while few are known, then exponentially weighted.
                alpha = max(DECODE_ALPHA, 1.0 / self._decodes)
                self._decode_s += alpha * (seconds - self._decode_s)

    def rates(self) -> ServiceRates | None:
        """The learned rates; None until both decode and prefill were seen often enough."""
        with self._lock:
            decodes, decode_s = self._decodes, self._decode_s
        fit = self.prefill.fit()
        if decodes < MIN_DECODES or fit is None or fit.s_per_token <= 0:
            return None
        return ServiceRates(fit.fixed_s, fit.s_per_token, decode_s)


def start_delay_s(in_flight: Sequence[InFlight], slots: int, rates: ServiceRates) -> float:
    """Seconds until a request routed now gets a running slot (0: one is free).

    Requests past their first byte hold a slot; of the rest, the oldest
    routed fill the slots left, the others wait in order.
    """
    if slots < 1 or len(in_flight) < slots:
        return 0.0
    decoding = [r for r in in_flight if r.since_first_byte_s is not None]
    waiting = [r for r in in_flight if r.since_first_byte_s is None]
    started = waiting[: max(0, slots - len(decoding))]
    queued = waiting[len(started) :]
    frees: list[float] = []
    for r in decoding:
        assert r.since_first_byte_s is not None
        frees.append(max(0.0, rates.decode_s - r.since_first_byte_s))
    for r in started:
        # Its prefill began when it was routed, at the latest: what is left of it.
        left = max(0.0, rates.prefill_s(r.prefill_tokens) - r.since_routed_s)
        frees.append(left + rates.decode_s)
    heapq.heapify(frees)
    for r in queued:
        free = heapq.heappop(frees)
        heapq.heappush(frees, free + rates.prefill_s(r.prefill_tokens) + rates.decode_s)
    return frees[0]
