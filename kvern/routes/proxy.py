"""Forwarding: the client's bytes go upstream unchanged, the answer comes back as it arrives.

The request is sent upstream before any tracking work is done; tracking is
handed to the brain beside it (:class:`~kvern.tracking.client.BrainClient`),
which never blocks the relay. The one exception is a
cache-aware choice among several upstreams, which needs the prompt's prefix
match first (bounded by ``routing.decision_timeout_ms``; see
:mod:`kvern.routing.router`); sending and failover are in
:mod:`kvern.routes.sending`. Streaming answers are
relayed chunk by chunk with no buffering; the relay keeps a bounded copy of
the bytes for the side reader that extracts usage and cached-token figures
after the stream ends. A client that goes away closes the upstream response,
which closes the upstream connection and so cancels the generation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kvern.errors import (
    BadRequest,
    BodyTooLarge,
    KvernError,
    error_response,
)
from kvern.prompt.requests import plain_text
from kvern.routes.sending import Attempt, ClientGone, send_with_failover
from kvern.services import Services
from kvern.tracking.records import Outcome, RequestContext
from kvern.upstream.client import forward_headers, mapped_errors, response_headers

# Bytes of a response kept for the side reader; past this only the tail is kept
# (usage and finish reason come last).
_KEEP_BYTES = 4 * 1024 * 1024
# A whole (non-streamed) answer up to this size goes to the brain for its usage figures.
_KEEP_WHOLE_BYTES = 8 * 1024 * 1024

_ENDPOINTS = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/api/chat"): "ollama_chat",
    ("POST", "/api/generate"): "ollama_generate",
}


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(raw: bytes) -> dict[str, Any] | None:
    """The body as kvern reads it; refuses only what no backend could accept.

    Not JSON, or JSON that is not an object, gets kvern's 400: no
    OpenAI-compatible backend takes either. Anything else (``messages: []``,
    a missing ``model``, fields of the wrong type) goes upstream unchanged;
    the backend is the judge of its own API, and kvern tracks what it can.
    None: valid JSON nested too deeply for Python's parser; it is forwarded
    unchanged and untracked (a backend with another parser may accept it).
    """
    try:
        body = json.loads(raw)
    except RecursionError:
        return None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _flag(value: Any, default: bool) -> bool:
    """A boolean field as a lenient backend reads it: ``"false"`` is false, not a truthy string."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    return bool(value)


def _parse_lenient(raw: bytes) -> dict[str, Any] | None:
    """Any other endpoint's body, if it is a JSON object (its model names the row)."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


class _Kept:
    """A bounded copy of relayed bytes: the head, then a rolling tail."""

    def __init__(self, limit: int = _KEEP_BYTES) -> None:
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


async def forward(request: Request) -> Response:
    """Forward one request upstream and relay the answer (a plain Starlette endpoint).

    Registered as Starlette routes, not FastAPI ones: the proxy path needs no
    parameter parsing, and skipping FastAPI's dependency solving is measurable
    in the added time to first byte.
    """
    services: Services = request.app.state.services
    try:
        return await _forward(services, request)
    except KvernError as exc:
        return error_response(exc)


async def _forward(services: Services, request: Request) -> Response:
    endpoint = _ENDPOINTS.get((request.method, request.url.path), "other")
    raw = await _read_body(request, services.config.proxy.max_body_bytes)
    if endpoint in ("chat", "completions"):
        body = _parse_body(raw)
    else:
        body = _parse_lenient(raw)

    model = body.get("model") if body is not None else None
    ctx = RequestContext(
        request_id="kv-" + uuid.uuid4().hex[:20],
        ts_s=services.clock(),
        start_s=time.perf_counter(),
        endpoint=endpoint,
        model=plain_text(model) if isinstance(model, str) else None,
        tenant=services.tenants.of(request.headers.get("authorization"), body),
        stream=_flag(body.get("stream"), endpoint.startswith("ollama")) if body else False,
        upstream=services.upstream.name,
    )
    # Every forwarded request gets its row; only one with a model and a known
    # endpoint goes through the brain (tokenized, walked through the trie).
    track = _Tracking(services, ctx, raw, tracked=ctx.model is not None and endpoint != "other")
    try:
        route = await services.router.route(ctx, body, request.headers, raw)
    except KvernError as exc:  # no upstream to send it to: still one analytics row
        ctx.upstream = "-"
        track.done(exc.status_code, exc.code, None, b"", "")
        raise
    ctx.route_reason = route.choice.reason
    ctx.route_load = route.choice.load
    headers_out = forward_headers(request.headers.raw)
    try:
        attempt = await send_with_failover(services, request, ctx, route, headers_out, raw)
    except ClientGone:
        # The client left while the upstream was still prefilling: the send was
        # cancelled, which closed the upstream connection and so the generation.
        track.done(None, "client_disconnected", None, b"", "")
        return Response(status_code=499)
    except KvernError as exc:
        track.done(exc.status_code, exc.code, None, b"", "")
        return error_response(exc)

    upstream_response = attempt.response
    headers = response_headers(upstream_response.headers)
    headers["x-kvern-request-id"] = ctx.request_id
    headers["x-kvern-upstream"] = attempt.route.replica.name
    content_type = upstream_response.headers.get("content-type", "")
    if not attempt.is_stream:
        return await _relay_whole(services, ctx, attempt, headers, content_type, track)
    return StreamingResponse(
        _relay_stream(services, ctx, attempt, content_type, track),
        status_code=upstream_response.status_code,
        headers=headers,
    )


class _Tracking:
    """Hands the request to the brain at the first byte, and its outcome at the end."""

    def __init__(self, services: Services, ctx: RequestContext, raw: bytes, *, tracked: bool):
        self.brain = services.tracker
        self.pool = services.pool
        self.ctx = ctx
        self.raw = raw
        self.tracked = tracked  # False: a row with no tracking figures, never sent to the brain
        self.begun = False

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
        self._begin(insert=status is not None and status < 400 and error is None)
        latency_ms = (time.perf_counter() - self.ctx.start_s) * 1000.0
        outcome = Outcome(status, error, ttfb_ms, latency_ms)
        if self.tracked:
            self.brain.complete(self.ctx, outcome, body=body, content_type=ctype)
        else:
            self.brain.record_plain(self.ctx, outcome)


async def _relay_whole(
    services: Services,
    ctx: RequestContext,
    attempt: Attempt,
    headers: dict[str, str],
    content_type: str,
    track: _Tracking,
) -> Response:
    upstream_response = attempt.response
    ttfb_ms = (time.perf_counter() - ctx.start_s) * 1000.0
    replica = attempt.route.replica
    replica.load.first_byte(ctx.request_id)
    try:
        with mapped_errors(replica.upstream):
            content = await upstream_response.aread()
    except KvernError as exc:
        track.done(exc.status_code, exc.code, ttfb_ms, b"", "")
        return error_response(exc)
    finally:
        attempt.end(ctx)
        await upstream_response.aclose()
    # The brain reads usage from the whole body; past the bound it gets none.
    kept = content if len(content) <= _KEEP_WHOLE_BYTES else b""
    track.done(upstream_response.status_code, None, ttfb_ms, kept, content_type)
    return Response(content, status_code=upstream_response.status_code, headers=headers)


async def _relay_stream(
    services: Services,
    ctx: RequestContext,
    attempt: Attempt,
    content_type: str,
    track: _Tracking,
) -> AsyncIterator[bytes]:
    upstream_response = attempt.response
    replica = attempt.route.replica
    kept = _Kept()
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
                yield chunk
                if ttfb_ms is None:
                    replica.load.first_byte(ctx.request_id)
                    ttfb_ms = (time.perf_counter() - ctx.start_s) * 1000.0
                    track.first_byte(status)
    except KvernError as exc:
        # Headers are already sent: the stream can only end early. Recorded,
        # and told to the client in the stream's own format, so an SDK raises
        # instead of taking a cut-off answer for a whole one.
        error = exc.code
        yield _stream_error(exc, content_type)
    except BaseException:
        error = "client_disconnected"
        raise
    finally:
        attempt.end(ctx)
        await upstream_response.aclose()
        track.done(status, error, ttfb_ms, kept.value(), content_type)


def _stream_error(exc: KvernError, content_type: str) -> bytes:
    """An error event: SSE ``data: {"error": ...}`` (OpenAI SDKs raise on it), or an NDJSON line."""
    if "ndjson" in content_type:  # Ollama's streams end with {"error": "..."}
        return (json.dumps({"error": exc.message}) + "\n").encode()
    return f"\n\ndata: {json.dumps(exc.body())}\n\n".encode()


def add_proxy_routes(app: Starlette) -> None:
    """Register the pass-through routes (last, so kvern's own endpoints win)."""
    app.add_route("/v1/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    app.add_route(
        "/api/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    )
