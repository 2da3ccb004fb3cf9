"""The fleet's load on each upstream: what the other kvern instances in front of it have in flight.

Why: several kvern instances behind one load balancer send to the same
replicas, and each sees only its own requests. An instance routing by its
own load alone piles onto a replica another instance is already filling.
Each instance therefore publishes its per-upstream load (:meth:`Load.snapshot
<kvern.routing.pool.Load.snapshot>`: requests in flight, prefill tokens
reserved, requests decoding, recent demand) every
``routing.shared_state_publish_ms``, and reads the others' in the same round
trip. :class:`Router <kvern.routing.router.Router>` adds their sum to each
candidate's own load.

Layout in the store (``P`` is ``routing.shared_state_prefix``)::

    P:load:<instance>   JSON {upstream: [in_flight, prefill_tokens, decoding, demand]},
                        expiring after shared_state_stale_ms (a dead instance drops out)
    P:load:instances    the set of instance ids that published (pruned when a key expired)

The request path reads only :meth:`SharedLoad.others`, a local copy swapped
in whole by the link's thread; a copy older than ``shared_state_stale_ms`` is
ignored (counted as ``fail_open``), so a slow or dead store costs routing
its view of the other instances, never time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvern.config import RoutingConfig
from kvern.routing.pool import UpstreamPool
from kvern.routing.shared_state import LinkThread, instance_id, link_view


def load_keys(prefix: str) -> tuple[str, str]:
    """(the start of each instance's load key, the key of the set of instances) under ``prefix``.

    One place for the layout above, read by ``kvern doctor`` too, so what it
    counts is what the instances write.
    """
    return f"{prefix}:load:", f"{prefix}:load:instances"


@dataclass(frozen=True, slots=True)
class FleetShare:
    """The other instances' load on one upstream, summed."""

    in_flight: int  # their requests sent there and not over
    prefill_tokens: int  # their uncached prompt tokens awaiting a first byte there
    decoding: int  # their requests past the first byte there
    demand: float  # their recent requests routed there (decayed count)


@dataclass(frozen=True, slots=True)
class _Copy:
    at_mono_s: float  # when it was read (time.monotonic)
    upstreams: dict[str, FleetShare]
    instances: int  # other instances that published


class SharedLoad(LinkThread):
    """Publishes this instance's load and keeps the others' (a thread of its own)."""

    def __init__(
        self,
        pool: UpstreamPool,
        config: RoutingConfig,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the wall clock the pool's loads are kept in (the app's, injected in tests)."""
        super().__init__(config, name="kvern-shared-load")
        self._clock = clock
        self.instance = instance or instance_id()
        self._pool = pool
        self._publish_s = config.shared_state_publish_ms / 1000.0
        self._stale_s = config.shared_state_stale_ms / 1000.0
        self._ttl_ms = max(1, int(config.shared_state_stale_ms))
        self._key_prefix, self._members_key = load_keys(config.shared_state_prefix)
        self._known: list[str] = []  # other instances, as of the last read
        self._gone: list[str] = []  # members whose key expired: pruned next round
        self._copy: _Copy | None = None
        self.fail_open = 0  # decisions made on local load: the copy was stale or missing

    # -- the request path (event loop) -------------------------------------------

    def others(self) -> dict[str, FleetShare] | None:
        """The other instances' load per upstream, or None (counted) when the copy is stale."""
        copy = self._copy
        if copy is None or time.monotonic() - copy.at_mono_s > self._stale_s:
            self.fail_open += 1
            return None
        return copy.upstreams

    # -- the link's thread ---------------------------------------------------------

    def _payload(self) -> str:
        now = self._clock()
        out: dict[str, list[float]] = {}
        for r in self._pool.replicas:
            snap = r.load.snapshot()
            demand = round(r.load.demand(now), 3)
            out[r.name] = [snap.in_flight, snap.prefill_tokens, snap.decoding, demand]
        return json.dumps(out, separators=(",", ":"))

    def step(self, client: Any) -> None:
        """One round trip: publish ours, prune the expired, list members, read the others."""
        pipe = client.pipeline(transaction=False)
        pipe.set(self._key_prefix + self.instance, self._payload(), px=self._ttl_ms)
        pipe.sadd(self._members_key, self.instance)
        if self._gone:
            pipe.srem(self._members_key, *self._gone)
        pipe.smembers(self._members_key)
        known = self._known
        if known:
            pipe.mget([self._key_prefix + m for m in known])
        results = pipe.execute()
        members = results[3 if self._gone else 2]
        values = results[-1] if known else []
        sums: dict[str, list[float]] = {}
        present = 0
        self._gone = []
        for member, raw in zip(known, values, strict=True):
            if raw is None:
                self._gone.append(member)
                continue
            try:
                rows = [(str(n), [float(row[i]) for i in range(4)]) for n, row in _rows(raw)]
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # another version's layout: not counted, never fatal
            present += 1
            for name, row in rows:
                acc = sums.setdefault(name, [0, 0, 0, 0.0])
                for i in range(4):
                    acc[i] += row[i]
        self._copy = _Copy(
            time.monotonic(),
            {
                name: FleetShare(int(a[0]), int(a[1]), int(a[2]), float(a[3]))
                for name, a in sums.items()
            },
            present,
        )
        names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        self._known = [m for m in names if m != self.instance]
        self.wait(self._publish_s)

    # -- reporting -------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """For ``/health``: the link, the counters and the other instances' load per upstream."""
        copy = self._copy
        fresh = copy is not None and time.monotonic() - copy.at_mono_s <= self._stale_s
        out = link_view(self, self._stale_s, fail_open=self.fail_open, dropped=0)
        out["instance"] = self.instance
        out["stale"] = not fresh
        out["other_instances"] = copy.instances if copy is not None else 0
        out["others_load"] = (
            {
                name: {
                    "in_flight": s.in_flight,
                    "prefill_tokens": s.prefill_tokens,
                    "decoding": s.decoding,
                }
                for name, s in copy.upstreams.items()
            }
            if copy is not None and fresh
            else {}
        )
        return out


def _rows(raw: bytes | str) -> list[tuple[Any, Any]]:
    """An instance's published value as (upstream, row) pairs; ValueError when it is not one."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("not a mapping")
    return list(value.items())
