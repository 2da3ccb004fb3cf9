"""Routing policies: pure choices over a snapshot of the candidate upstreams.

``cache_aware`` in words: send the request where its first token is expected
soonest. At each candidate that is the queue wait (work ahead of it when no
slot is free) plus the prefill of the prompt tokens not cached there, plus,
where it would compute a prefix another upstream already holds, what that
copy costs: the duplicated tokens times how full its cache is (a full cache
makes room by evicting prefixes other requests would have reused). One rule
in one unit (prompt-token equivalents), with no thresholds to tune: a holder
keeps its prefixes until its queue costs more than recomputing them
elsewhere.

Hot prefixes are replicated on purpose: when a prefix many requests share
(a tenant's system prompt: its node in the trie sees at least
``hot_prefix_per_s`` requests a second) is held by fewer than
``hot_prefix_replicas`` upstreams and every holder is queued, the request
goes to the non-holder with the shortest queue, once -- it then holds the
prefix too, and later requests balance among the holders by the rule above.
Without it the rule spills one request at a time to whichever replica is
idle, scattering a hot tenant's new sessions; with it the copies are where
the next sessions will look.

A miss (no prefix of at least ``min_match_tokens`` anywhere) goes where it
starts soonest; among equally soon replicas, to the one sent the least
content so far (the prompt tokens ever newly marked there: SGLang's router
picks by the size of its per-worker tree, the same measure), then the least
recent demand, then the emptier cache. A new prefix decides where all its
later requests go, so what spreads evenly is the content and the traffic it
draws, not the load of this moment; on the routing bench this placement
kept hit rate at SGLang's where placing by recent demand lost 0.3-0.6
points. Load counts tokens of prefill and running decodes, not requests.

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
    own_demand: float = 0.0  # of those, routed by this kvern instance
    assigned: int = 0  # prompt tokens ever newly sent its way (modelled presence)

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
    # Its expected time to first token there, in prompt-token equivalents
    # (cache_aware only; None: the policy does not estimate it).
    expected: float | None = None
    # The same in milliseconds, by the replica's learned TTFT line (None until learned).
    expected_ms: float | None = None


def _by_load(cands: Sequence[Candidate]) -> list[Candidate]:
    """Least loaded first; the sort is stable, so equal loads keep the caller's order."""
    return sorted(cands, key=lambda c: (c.full, c.weighted_load, c.in_flight))


def _choice(
    best: Candidate, cands: Sequence[Candidate], reason: str, expected: float | None = None
) -> Choice:
    rest = [c.replica for c in _by_load(cands) if c is not best]
    return Choice(best.replica, reason, best.cached, best.load, rest, expected)


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


def _holds(c: Candidate, holder: Candidate) -> bool:
    """``c`` holds (nearly all of) the longest held prefix: it needs no copy of it."""
    return c.cached >= holder.cached - holder.cached // 10


def cache_aware(
    cands: Sequence[Candidate], num_tokens: int, cfg: RoutingConfig, hot_per_s: float = 0.0
) -> Choice:
    """The soonest expected first token, counting a copy's cost; hot prefixes replicated.

    ``hot_per_s``: requests per second through the longest held prefix (its
    trie node); at least ``cfg.hot_prefix_per_s`` makes it hot.
    """
    holder = min(cands, key=lambda c: (-c.cached, c.cost(num_tokens)))

    def spill(c: Candidate) -> float:
        duplicated = max(0, holder.cached - c.cached)
        return cfg.spill_reuse_weight * duplicated * c.fill / c.replica.entry.weight

    def soonest(c: Candidate) -> tuple[float, bool, float, float]:
        # Equal cost: a holder (its copy stays warm); then the replica with the
        # least recent demand, so a new prefix (likely a new tenant, whose
        # later requests will follow it) lands where traffic is lightest over
        # time, not just now; then the emptier cache.
        copies = holder.cached >= cfg.min_match_tokens and not _holds(c, holder)
        return (c.cost(num_tokens) + spill(c), copies, c.demand / c.replica.entry.weight, c.fill)

    def least_assigned(c: Candidate) -> tuple[float, bool, float, float, float]:
        # A new prefix (no one holds it) among equally soon replicas: the one
        # sent the least content so far. Its later requests will follow it,
        # so this spreads the fleet's prefixes (and the traffic they draw)
        # evenly, as SGLang's router does by its trees' sizes.
        first, copies, demand, fill = soonest(c)
        return (first, copies, c.assigned / c.replica.entry.weight, demand, fill)

    if holder.cached < cfg.min_match_tokens:
        best = min(cands, key=least_assigned)
        return _choice(best, cands, "miss", best.cost(num_tokens))
    holders = [c for c in cands if _holds(c, holder)]
    if (
        hot_per_s >= cfg.hot_prefix_per_s
        and len(holders) < cfg.hot_prefix_replicas
        and all(h.wait > 0 for h in holders)
    ):
        queue = min(h.wait for h in holders)
        others = [c for c in cands if not _holds(c, holder) and c.wait < queue]
        if others:
            copy = min(others, key=lambda c: (c.wait, c.demand / c.replica.entry.weight, c.fill))
            return _choice(copy, cands, "replicate", copy.cost(num_tokens))
    best = min(cands, key=soonest)
    if _holds(best, holder):
        return _choice(best, cands, "prefix", best.cost(num_tokens))
    return _choice(best, cands, "prefix_overloaded", best.cost(num_tokens))
