"""Routing policies: pure choices over a snapshot of the candidate upstreams.

``cache_aware`` in words: send the request to the upstream holding its longest
block-aligned prefix, unless that upstream is overloaded, i.e. its load is
more than ``balance_abs_tokens`` above the least loaded upstream's AND more
than ``balance_rel`` times it, or it is at its ``max_concurrency``. On a miss
(no prefix of at least ``min_match_tokens``) or when the holder is
overloaded, pick the upstream with the least work ahead of this request:
``(load + uncached prompt tokens there) / weight``. Unlike SGLang's router,
a miss goes by load rather than by the smallest tree, and load counts tokens
of prefill and running decodes rather than requests.

Every choice comes with a short reason string kept in analytics.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvern.config import RoutingConfig
from kvern.routing.pool import Replica


@dataclass(slots=True)
class Candidate:
    """One upstream as a policy sees it at decision time."""

    replica: Replica
    load: int  # tokens of work in flight: uncached prefill + decode_load_tokens per request
    in_flight: int
    wait: float = 0.0  # token-equivalents a new request waits before its prefill starts
    cached: int = 0  # prompt tokens it should serve from cache (block-aligned)
    fill: float = 0.0  # share of its modelled cache budget in use (0 when unknown)
    demand: float = 0.0  # requests routed to it recently (decayed)

    @property
    def weighted_load(self) -> float:
        return self.load / self.replica.entry.weight

    def cost(self, num_tokens: int) -> float:
        """Estimated time to this request's first token, in prompt-token equivalents."""
        return (self.wait + num_tokens - self.cached) / self.replica.entry.weight

    @property
    def full(self) -> bool:
        limit = self.replica.entry.max_concurrency
        return limit > 0 and self.in_flight >= limit


@dataclass(slots=True)
class Choice:
    """The upstream picked, why, and the others in failover order."""

    replica: Replica
    reason: str
    cached: int  # predicted cached prompt tokens there
    load: int  # its load at decision time
    fallbacks: list[Replica]


def _by_load(cands: Sequence[Candidate]) -> list[Candidate]:
    """Least loaded first; the sort is stable, so equal loads keep the caller's order."""
    return sorted(cands, key=lambda c: (c.full, c.weighted_load, c.in_flight))


def _choice(best: Candidate, cands: Sequence[Candidate], reason: str) -> Choice:
    rest = [c.replica for c in _by_load(cands) if c is not best]
    return Choice(best.replica, reason, best.cached, best.load, rest)


def least_load(cands: Sequence[Candidate], reason: str = "least_load") -> Choice:
    return _choice(_by_load(cands)[0], cands, reason)


class RoundRobin:
    """Smooth weighted round robin (nginx's): even interleaving in proportion to weight."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, cands: Sequence[Candidate]) -> Choice:
        total = sum(c.replica.entry.weight for c in cands)
        best: Candidate | None = None
        for c in cands:
            name = c.replica.name
            self._current[name] = self._current.get(name, 0.0) + c.replica.entry.weight
            if best is None or self._current[name] > self._current[best.replica.name]:
                best = c
        assert best is not None
        self._current[best.replica.name] -= total
        return _choice(best, cands, "round_robin")


def session(cands: Sequence[Candidate], key: str | None) -> Choice:
    """Rendezvous hashing on the session key: stable while the set of upstreams is.

    When an upstream leaves, only its sessions move; failover follows the
    same ranking, so a session's second home is stable too.
    """
    if not key:
        return least_load(cands, "session_none")

    def score(c: Candidate) -> float:
        # Weighted rendezvous: -w / ln(h) with h uniform in (0, 1) gives each
        # upstream a share of keys proportional to its weight.
        digest = hashlib.blake2b(f"{c.replica.name}\0{key}".encode(), digest_size=8).digest()
        h = (int.from_bytes(digest, "big") + 0.5) / 2**64
        return -c.replica.entry.weight / math.log(h)

    ranked = sorted(cands, key=score, reverse=True)
    return Choice(
        ranked[0].replica,
        "session",
        ranked[0].cached,
        ranked[0].load,
        [c.replica for c in ranked[1:]],
    )


def cache_aware(cands: Sequence[Candidate], num_tokens: int, cfg: RoutingConfig) -> Choice:
    """Longest cached prefix unless overloaded; otherwise the soonest first token."""

    def soonest(c: Candidate) -> tuple[float, float, float]:
        # Equal cost (free slots everywhere): the replica with the least recent
        # demand, so a new prefix (likely a new tenant, whose later requests
        # will follow it) lands where traffic is lightest over time, not just
        # now; then the emptier cache.
        return (c.cost(num_tokens), c.demand / c.replica.entry.weight, c.fill)

    best = min(cands, key=soonest)
    holder = min(cands, key=lambda c: (-c.cached, c.cost(num_tokens)))
    if holder.cached < cfg.min_match_tokens:
        return _choice(best, cands, "miss")
    excess = holder.cost(num_tokens) - best.cost(num_tokens)
    if excess > cfg.balance_abs_tokens and holder.cost(num_tokens) > cfg.balance_rel * best.cost(
        num_tokens
    ):
        return _choice(best, cands, "prefix_overloaded")
    return _choice(holder, cands, "prefix")
