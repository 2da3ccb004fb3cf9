"""Relaying an upstream answer to the client, and telling tracking how it went.

Why a module of its own: what reaches the client must be the upstream's
bytes, as they come, while kvern keeps a bounded side copy to read usage from
and records exactly how the answer ended. Three cases:

- **A stream** (SSE or NDJSON) is relayed chunk by chunk. An upstream failure
  after the first byte ends it with an error event in the stream's own format
  (OpenAI SDKs raise on it). A client that closes the stream once its
  terminal event (``data: [DONE]``, Ollama's ``"done": true``) went out has
  the whole answer: that is not a disconnect.
- **A whole answer** up to :data:`WHOLE_BUFFER_BYTES` is read, then sent with
  its length, so an upstream failure while reading it is still a clean 502.
- **A larger whole answer** is relayed as it arrives (memory stays bounded,
  whatever its size), with the upstream's ``Content-Length``; if the upstream
  fails midway, kvern closes the connection, so the client sees a cut answer,
  never a short one that looks complete.

Bytes are relayed raw, with the upstream's ``Content-Encoding``: a compressed
answer reaches the client exactly as the upstream sent it, and only the side
copy is decoded (:mod:`kvern.upstream.encoding`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvern.errors import KvernError, ShuttingDown, error_response
from kvern.routes.inflight import Entry
from kvern.routes.sending import Attempt
from kvern.services import Services
from kvern.tracking.records import Outcome, RequestContext
from kvern.upstream.client import mapped_errors
from kvern.upstream.encoding import readable_copy

# Bytes of a stream kept for the side reader; past this only the head and a
# rolling tail are kept (usage and finish reason come last).
KEEP_BYTES = 4 * 1024 * 1024
# A whole answer up to this size goes to the brain for its usage figures.
KEEP_WHOLE_BYTES = 8 * 1024 * 1024
# A whole answer up to this size is read before its headers go out.
WHOLE_BUFFER_BYTES = 1024 * 1024

# Markers of a stream's terminal event: OpenAI-style SSE, and Ollama's NDJSON.
_TERMINAL_MARKERS = (b"data: [DONE]", b'"done":true', b'"done": true')
_MARKER_OVERLAP = max(len(m) for m in _TERMINAL_MARKERS) - 1


class RequestTrack:
    """Hands the request to the brain at the first byte, and its outcome at the end.

    ``tracked`` False: a request with no prompt to track still gets its row,
    written without the brain. ``done`` is idempotent: the first outcome wins.
    """

    def __init__(
        self, services: Services, ctx: RequestContext, raw: bytes, entry: Entry, *, tracked: bool
    ) -> None:
        self.brain = services.tracker
        self.pool = services.pool
        self.inflight = services.inflight
        self.ctx = ctx
        self.raw = raw
        self.entry = entry
        self.tracked = tracked
        self.begun = False
        self.finished = False

    def _begin(self, insert: bool) -> None:
        if self.tracked and not self.begun:
            self.begun = True
            oldest = self.pool.oldest_awaiting()
            self.brain.begin(self.ctx, self.raw, insert=insert, oldest_awaiting_s=oldest)

    def first_byte(self, status: int) -> None:
        self._begin(insert=status < 400)

    def done(
        self, status: int | None, error: str | None, ttfb_ms: float | None, body: bytes, ctype: str
    ) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self._begin(insert=status is not None and status < 400 and error is None)
            latency_ms = (time.perf_counter() - self.ctx.start_s) * 1000.0
            outcome = Outcome(status, error, ttfb_ms, latency_ms)
            if self.tracked:
                self.brain.complete(self.ctx, outcome, body=body, content_type=ctype)
            else:
                self.brain.record_plain(self.ctx, outcome)
        finally:
            self.inflight.leave(self.ctx.request_id)


def _shutdown_or(exc: KvernError, track: RequestTrack) -> KvernError:
    """The error to report: the shutdown's own when it ended the request, else ``exc``."""
    if track.entry.cut:
        return ShuttingDown("kvern is shutting down: the request was ended after its grace")
    return exc


async def relay_whole(
    services: Services,
    ctx: RequestContext,
    attempt: Attempt,
    headers: dict[str, str],
    track: RequestTrack,
) -> Response:
    """A non-streamed answer: whole if small, else relayed as it arrives (bounded memory)."""
    upstream_response = attempt.response
    replica = attempt.route.replica
    status = upstream_response.status_code
    content_type = upstream_response.headers.get("content-type", "")
    encoding = upstream_response.headers.get("content-encoding")
    ttfb_ms = (time.perf_counter() - ctx.start_s) * 1000.0
    replica.load.first_byte(ctx.request_id)
    chunks = upstream_response.aiter_raw()
    head: list[bytes] = []
    size = 0
    try:
        with mapped_errors(replica.upstream):
            async for chunk in chunks:
                head.append(chunk)
                size += len(chunk)
                if size > WHOLE_BUFFER_BYTES:
                    break
            else:
                content = b"".join(head)
                kept = readable_copy(content, encoding, KEEP_WHOLE_BYTES)
                track.done(status, None, ttfb_ms, kept, content_type)
                return Response(content, status_code=status, headers=headers)
    except KvernError as exc:
        error = _shutdown_or(exc, track)
        track.done(error.status_code, error.code, ttfb_ms, b"", "")
        return error_response(error)
    finally:
        if size <= WHOLE_BUFFER_BYTES:
            attempt.end(ctx)
            await upstream_response.aclose()
    length = upstream_response.headers.get("content-length")
    if length is not None:
        headers["content-length"] = length
    body = _relay_large(ctx, attempt, head, size, chunks, track, ttfb_ms)
    return CutOnFailure(
        body, status_code=status, headers=headers, settle=_abandoned(attempt, ctx, track)
    )


def _abandoned(
    attempt: Attempt, ctx: RequestContext, track: RequestTrack
) -> Callable[[], Awaitable[None]]:
    """What settles a relay whose body never began: the client left first."""

    async def settle() -> None:
        if not track.finished:
            attempt.end(ctx)
            track.done(attempt.response.status_code, "client_disconnected", None, b"", "")
            await attempt.response.aclose()

    return settle


class ResponseCut(Exception):
    """The upstream failed after the headers went out: the client's connection must be cut."""


class CutOnFailure(Response):
    """A response relayed as it arrives, whose connection is cut if the body cannot end.

    Why not a StreamingResponse: when its iterator stops early it ends the
    body as if it were complete (a chunked answer then looks whole to the
    client). Here, :class:`ResponseCut` returns without the final message, so
    the server closes the connection and the client raises.
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        status_code: int,
        headers: dict[str, str],
        settle: Callable[[], Awaitable[None]],
    ) -> None:
        self.body_iterator = body
        self.status_code = status_code
        self.background = None
        self._settle = settle
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            try:
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except ResponseCut:
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # However it ended (a client gone before the body began included),
            # the body's own ending runs now, and one that never began is settled.
            await self.body_iterator.aclose()
            await self._settle()


async def _relay_large(
    ctx: RequestContext,
    attempt: Attempt,
    head: list[bytes],
    size: int,
    chunks: AsyncIterator[bytes],
    track: RequestTrack,
    ttfb_ms: float,
) -> AsyncGenerator[bytes, None]:
    upstream_response = attempt.response
    replica = attempt.route.replica
    content_type = upstream_response.headers.get("content-type", "")
    encoding = upstream_response.headers.get("content-encoding")
    kept: list[bytes] | None = list(head)  # dropped once past KEEP_WHOLE_BYTES
    error: str | None = None
    status: int | None = upstream_response.status_code
    try:
        for chunk in head:
            yield chunk
        head.clear()
        with mapped_errors(replica.upstream):
            async for chunk in chunks:
                size += len(chunk)
                if kept is not None:
                    kept.append(chunk)
                    if size > KEEP_WHOLE_BYTES:
                        kept = None
                yield chunk
    except KvernError as exc:
        error = _shutdown_or(exc, track).code
        raise ResponseCut() from exc
    except BaseException:
        error = "client_disconnected"
        raise
    finally:
        # Settled before the last await: in a cancelled scope (a client that
        # left) that await may raise at once, and the row must not depend on it.
        attempt.end(ctx)
        body = readable_copy(b"".join(kept), encoding, KEEP_WHOLE_BYTES) if kept else b""
        track.done(status, error, ttfb_ms, body if error is None else b"", content_type)
        await upstream_response.aclose()


class _Kept:
    """A bounded copy of relayed bytes: the head, then a rolling tail."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size > self.limit and len(self.chunks) > 1:
            self.size -= len(self.chunks.pop(len(self.chunks) // 2))

    def value(self) -> bytes:
        return b"".join(self.chunks)


class TerminalWatch:
    """Whether a stream's terminal event has gone out (markers may span two chunks)."""

    def __init__(self) -> None:
        self.seen = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.seen:
            return
        window = self._tail + chunk
        if any(m in window for m in _TERMINAL_MARKERS):
            self.seen = True
        self._tail = window[-_MARKER_OVERLAP:]


def relay_stream(
    services: Services,
    ctx: RequestContext,
    attempt: Attempt,
    headers: dict[str, str],
    track: RequestTrack,
) -> StreamingResponse:
    """A streamed answer, relayed chunk by chunk."""
    return _TrackedStream(_stream_chunks(ctx, attempt, track), ctx, attempt, track, headers)


class _TrackedStream(StreamingResponse):
    """A stream whose end is settled when the response ends, however it ends.

    Why: a client that leaves before the first chunk goes out (or while one
    is being sent) stops the response outside the chunk loop; its generator
    would be finalized whenever the collector gets to it, or never run at
    all, and the request would have no row. Closing it here runs its own
    ending at once; one that never started is settled here.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        ctx: RequestContext,
        attempt: Attempt,
        track: RequestTrack,
        headers: dict[str, str],
    ) -> None:
        super().__init__(chunks, status_code=attempt.response.status_code, headers=headers)
        self._chunks = chunks
        self._ctx = ctx
        self._attempt = attempt
        self._track = track

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._chunks.aclose()
            await _abandoned(self._attempt, self._ctx, self._track)()


async def _stream_chunks(
    ctx: RequestContext, attempt: Attempt, track: RequestTrack
) -> AsyncGenerator[bytes, None]:
    upstream_response = attempt.response
    replica = attempt.route.replica
    content_type = upstream_response.headers.get("content-type", "")
    encoding = upstream_response.headers.get("content-encoding")
    kept = _Kept()
    terminal = TerminalWatch()
    ttfb_ms: float | None = None
    error: str | None = None
    status = upstream_response.status_code
    chunks = attempt.chunks
    assert chunks is not None, "a stream's attempt holds its chunks"
    try:
        with mapped_errors(replica.upstream):
            pending = attempt.first
            while True:
                if pending is not None:
                    chunk, pending = pending, None
                else:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                if not chunk:
                    continue
                kept.add(chunk)
                terminal.feed(chunk)
                yield chunk
                if ttfb_ms is None:
                    replica.load.first_byte(ctx.request_id)
                    ttfb_ms = (time.perf_counter() - ctx.start_s) * 1000.0
                    track.first_byte(status)
    except KvernError as exc:
        if not terminal.seen:
            # Headers are already sent: the stream can only end early. Recorded,
            # and told to the client in the stream's own format, so an SDK raises
            # instead of taking a cut-off answer for a whole one.
            failure = _shutdown_or(exc, track)
            error = failure.code
            yield _stream_error(failure, content_type)
    except BaseException:
        # The client left. After the terminal event it had the whole answer
        # (the official SDKs close right after [DONE]): not an error.
        if not terminal.seen:
            error = "client_disconnected"
        raise
    finally:
        # Settled before the last await (see _relay_large).
        attempt.end(ctx)
        body = readable_copy(kept.value(), encoding, KEEP_WHOLE_BYTES)
        track.done(status, error, ttfb_ms, body, content_type)
        await upstream_response.aclose()


def _stream_error(exc: KvernError, content_type: str) -> bytes:
    """An error event: SSE ``data: {"error": ...}`` (OpenAI SDKs raise on it), or an NDJSON line."""
    if "ndjson" in content_type:  # Ollama's streams end with {"error": "..."}
        return (json.dumps({"error": exc.message}) + "\n").encode()
    return f"\n\ndata: {json.dumps(exc.body())}\n\n".encode()
