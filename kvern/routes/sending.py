"""Sending a request upstream: failover before the first byte, and leaving with the client.

Why a module of its own: the boundary "nothing has reached the client yet" is
where a request may still go to another upstream, and it is subtle. For a
streamed answer the first chunk is read here, before any header goes to the
client, because a replica that dies during prefill has usually sent its
headers already (vLLM and Starlette send them at once) but no token. After
that chunk the answer is the client's, and an upstream failure can only end
the stream early (:mod:`kvern.routes.proxy`).

A client that leaves while the upstream is still prefilling cancels the send,
which closes the upstream connection and so the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import httpx
from starlette.requests import Request

from kvern.errors import KvernError, NoHealthyUpstream, UpstreamError, UpstreamsFailed
from kvern.routing.router import RouteState
from kvern.services import Services
from kvern.tracking.records import RequestContext
from kvern.upstream.client import mapped_errors
from kvern.upstream.pools import STALE_RETRIED

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the upstream answered."""


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body was already read, so only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _send_unless_disconnected(request: Request, send: Coroutine[Any, Any, T]) -> T:
    """Await the upstream's response headers, cancelling the send if the client leaves first.

    A long prefill can take seconds before the first byte; without this, a
    client that gives up would leave the upstream computing for nobody.
    """
    send_task = asyncio.ensure_future(send)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({send_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        send_task.cancel()
        raise
    finally:
        watch_task.cancel()
    if send_task in done:
        return send_task.result()
    send_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await send_task
    raise ClientGone()


class Attempt:
    """The upstream response being relayed, with its first chunk already read (streams)."""

    def __init__(self, route: RouteState, response: httpx.Response) -> None:
        self.route = route
        self.response = response
        self.first: bytes | None = None  # a stream's first chunk, read before any header
        self.chunks: AsyncIterator[bytes] | None = None  # the rest of a stream; None: whole

    @property
    def is_stream(self) -> bool:
        return self.chunks is not None

    def end(self, ctx: RequestContext) -> None:
        """Release the load this request put on its upstream (idempotent per stage)."""
        self.route.replica.load.end(ctx.request_id)


def _retryable(exc: KvernError) -> bool:
    """A failure after which nothing reached the client and the request may go elsewhere.

    Not a read timeout: the upstream may still be working on it.
    """
    cause = exc.__cause__
    return isinstance(exc, UpstreamError) and not isinstance(
        cause, (httpx.ReadTimeout, httpx.WriteTimeout)
    )


async def send_with_failover(
    services: Services,
    request: Request,
    ctx: RequestContext,
    route: RouteState,
    headers: list[tuple[bytes, bytes]],
    raw: bytes,
) -> Attempt:
    """Send to the chosen upstream; on a failure before any byte, try the next one.

    A streamed answer's first chunk is read here, before any header goes to
    the client: a replica that dies during prefill has sent its headers
    already (vLLM and Starlette send them at once) but no token, and the
    request can still go elsewhere. When every upstream tried fails so, the
    error names each one and why (:class:`kvern.errors.UpstreamsFailed`).
    """
    monitor, router = services.health, services.router
    retry_statuses = set(services.config.routing.retry_on_status)
    tried: set[str] = set()
    current: RouteState | None = route
    failures: list[KvernError] = []
    while current is not None:
        replica = current.replica
        tried.add(replica.name)
        ctx.upstream = replica.name
        ctx.route_attempts = current.attempts
        if current is not route:
            replica.load.reserve(ctx.request_id, current.prefill_tokens, services.clock())
        if not monitor.acquire(replica):
            replica.load.end(ctx.request_id)
            failures.append(NoHealthyUpstream(f"upstream {replica.name}: circuit open"))
            current = router.next_attempt(current, tried)
            continue
        replica.counters.requests += 1
        try:
            attempt = await _try_once(services, request, ctx, current, headers, raw)
        except KvernError as exc:
            replica.load.end(ctx.request_id)
            monitor.failed(replica, exc.message)
            replica.counters.failures += 1
            failures.append(exc)
            if not _retryable(exc):
                raise _named_all(failures) from exc.__cause__
            nxt = router.next_attempt(current, tried)
        except BaseException:
            replica.load.end(ctx.request_id)
            raise
        else:
            status = attempt.response.status_code
            nxt = router.next_attempt(current, tried) if status in retry_statuses else None
            if nxt is None:  # relayed as it is: a success, or the last upstream's answer
                if status < 500:
                    monitor.succeeded(replica)
                elif status in retry_statuses:
                    monitor.failed(replica, f"answered {status}")
                return attempt
            await attempt.response.aclose()
            attempt.end(ctx)
            monitor.failed(replica, f"answered {status}")
            failures.append(UpstreamError(replica.name, f"answered {status}"))
            replica.counters.failures += 1
        if nxt is not None:
            replica.counters.failovers += 1
        current = nxt
    raise _named_all(failures)


def _named_all(failures: list[KvernError]) -> KvernError:
    """The error for a request no upstream answered: the one failure, or all of them named."""
    assert failures, "an upstream was tried, or its circuit was open"
    return failures[0] if len(failures) == 1 else UpstreamsFailed(failures)


async def _try_once(
    services: Services,
    request: Request,
    ctx: RequestContext,
    route: RouteState,
    headers: list[tuple[bytes, bytes]],
    raw: bytes,
) -> Attempt:
    upstream = route.replica.upstream
    client = services.client
    upstream_request = client.build_request(
        request.method,
        upstream.url_for(request.url.path, request.url.query),
        headers=headers,
        content=raw,
    )
    with mapped_errors(upstream):
        response = await _send_unless_disconnected(
            request, client.send(upstream_request, stream=True)
        )
    if response.extensions.get(STALE_RETRIED):
        route.replica.counters.stale_retries += 1
    attempt = Attempt(route, response)
    content_type = response.headers.get("content-type", "")
    # What the client asked for, or what the upstream sends (Ollama streams by default).
    if not ("event-stream" in content_type or "ndjson" in content_type or ctx.stream):
        return attempt
    chunks = response.aiter_raw()
    try:
        with mapped_errors(upstream):
            attempt.first = await _send_unless_disconnected(request, _first_chunk(chunks))
    except BaseException:
        await response.aclose()
        raise
    attempt.chunks = chunks
    return attempt


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    async for chunk in chunks:
        if chunk:
            return chunk
    return b""
