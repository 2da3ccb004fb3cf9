"""Several small connection pools behind one client, so a request never scans a large one;
and a request the server dropped on a reused connection sent once more, on a fresh one.

Why shards: httpcore's pool (1.0.x) re-examines every connection it holds
twice per request, and for each idle one counts the idle ones again -- work
that grows with the square of the pool. With the 64 kept-alive connections a
proxy under concurrency needs, that was about half a millisecond of the
relay's CPU on every request, on the event loop, before the first byte.
Shards of at most :data:`SHARD_KEEPALIVE` kept-alive connections, taken in
turn, hold the same number of connections in all and keep each scan short. A
transport, so the client, its timeouts and error mapping stay one (and tests
still inject their own transport instead).

Why the retry: a kept-alive connection can be closed by the server just as
the next request goes out on it (llama-server does this every few dozen
requests); the pool cannot see it coming, and the request fails with
``Server disconnected without sending a response.`` although nothing is
wrong with the server. Each connection's socket is watched
(:mod:`kvern.upstream.reuse`), so such a failure is told apart from every
other; only it is retried, once, on a connection opened for the retry.
"""

from __future__ import annotations

import itertools
import logging
import math

import httpcore
import httpx

from kvern.upstream.reuse import ReuseWatchingBackend, StaleConnection

log = logging.getLogger(__name__)

# Kept-alive connections per shard: small enough that a scan stays cheap.
SHARD_KEEPALIVE = 16

# Set in a response's extensions when it came from the retry after a stale
# connection: the caller counts it (``/health``'s ``stale_retries``).
STALE_RETRIED = "kvern.stale_retried"


def _watched_transport(
    limits: httpx.Limits, backend: httpcore.AsyncNetworkBackend, trust_env: bool
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose pool opens its sockets through ``backend``.

    httpx takes no network backend, so its pool is rebuilt with the same
    settings plus this one (httpcore's pool takes it as a public argument).
    """
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=trust_env)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=trust_env),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return transport


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes in memory, not a stream already consumed."""
    return isinstance(request.stream, httpx.ByteStream)


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
        backend = ReuseWatchingBackend()
        self.shards = [_watched_transport(each, backend, trust_env) for _ in range(n)]
        # Keeps no idle connection, so every request on it opens a new one:
        # where a request the server dropped on a reused connection goes again.
        self.fresh = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            trust_env=trust_env,
        )
        self._turn = itertools.cycle(range(n))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send on the next shard; if a reused connection was dropped unanswered, once more.

        Retried only when the server closed (or reset) a connection that had
        already carried a whole answer, before sending one byte of this one.
        That is the keep-alive race: a server ends an idle connection when its
        keep-alive wait runs out, without reading what arrives next, so the
        request -- a POST too -- was never processed. Had the server taken it
        and died before answering, sending it again costs one more generation,
        never a wrong answer (an inference request changes no state). Once any
        byte of the answer has arrived, nothing is retried: the failure is the
        caller's, as before. A timeout is no such case either (the server may
        be working), nor a body that cannot be sent twice.
        """
        try:
            return await self.shards[next(self._turn)].handle_async_request(request)
        except httpx.RemoteProtocolError as exc:
            if not isinstance(exc.__cause__, StaleConnection) or not _replayable(request):
                raise
            log.debug("%s dropped a reused connection unanswered; sent again", request.url)
        response = await self.fresh.handle_async_request(request)
        response.extensions[STALE_RETRIED] = True
        return response

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()
        await self.fresh.aclose()
