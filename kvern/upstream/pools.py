"""Several small connection pools behind one client, so a request never scans a large one.

Why: httpcore's pool (1.0.x) re-examines every connection it holds twice per
request, and for each idle one counts the idle ones again -- work that grows
with the square of the pool. With the 64 kept-alive connections a proxy under
concurrency needs, that was about half a millisecond of the relay's CPU on
every request, on the event loop, before the first byte. Shards of at most
:data:`SHARD_KEEPALIVE` kept-alive connections, taken in turn, hold the same
number of connections in all and keep each scan short. A transport, so the
client, its timeouts and error mapping stay one (and tests still inject
their own transport instead).
"""

from __future__ import annotations

import itertools
import math

import httpx

# Kept-alive connections per shard: small enough that a scan stays cheap.
SHARD_KEEPALIVE = 16


class ShardedPools(httpx.AsyncBaseTransport):
    """Round-robin over ``n`` :class:`httpx.AsyncHTTPTransport` pools sharing the limits."""

    def __init__(self, limits: httpx.Limits, *, trust_env: bool = False) -> None:
        keepalive = limits.max_keepalive_connections or 0
        total = limits.max_connections
        n = max(1, math.ceil(keepalive / SHARD_KEEPALIVE))
        if total is not None:
            n = min(n, total)
        each = httpx.Limits(
            max_connections=None if total is None else max(1, math.ceil(total / n)),
            max_keepalive_connections=math.ceil(keepalive / n),
            keepalive_expiry=limits.keepalive_expiry,
        )
        self.shards = [httpx.AsyncHTTPTransport(limits=each, trust_env=trust_env) for _ in range(n)]
        self._turn = itertools.cycle(range(n))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.shards[next(self._turn)].handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()
