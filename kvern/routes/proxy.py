"""Forwarding: the client's bytes go upstream unchanged, the answer comes back as it arrives.

The request is sent upstream before any tracking work is done; tracking is
handed to the brain beside it (:class:`~kvern.tracking.client.BrainClient`),
which never blocks the relay. The one exception is a
cache-aware choice among several upstreams, which needs the prompt's prefix
match first (bounded by ``routing.decision_timeout_ms``; see
:mod:`kvern.routing.router`); sending and failover are in
:mod:`kvern.routes.sending`; relaying the answer in
:mod:`kvern.routes.relay`. A client that goes away closes the upstream
response, which closes the upstream connection and so cancels the generation.
Every request is registered in :class:`~kvern.routes.inflight.InFlight` from
arrival to its row, which is what a graceful shutdown waits for and ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from kvern.errors import (
    BadRequest,
    KvernError,
    ShuttingDown,
    error_response,
)
from kvern.prompt.requests import plain_text
from kvern.request_body import read_body
from kvern.routes.relay import RequestTrack, relay_stream, relay_whole
from kvern.routes.sending import ClientGone, send_with_failover
from kvern.services import Services
from kvern.tracking.records import RequestContext
from kvern.upstream.client import forward_headers, response_headers

_ENDPOINTS = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/api/chat"): "ollama_chat",
    ("POST", "/api/generate"): "ollama_generate",
}


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
    except ClientDisconnect:
        # The client left while sending its body: nothing was forwarded, and
        # nobody is there to read an answer.
        return Response(status_code=499)


async def _forward(services: Services, request: Request) -> Response:
    endpoint = _ENDPOINTS.get((request.method, request.url.path), "other")
    proxy = services.config.proxy
    raw = await read_body(
        request, proxy.max_body_bytes, proxy.body_read_timeout_s, "proxy.body_read_timeout_s"
    )
    received_s = time.perf_counter()
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
        tenant=services.tenants.tenant(request.headers.get("authorization")),
        stream=_flag(body.get("stream"), endpoint.startswith("ollama")) if body else False,
        upstream=services.upstream.name,
        end_user=services.tenants.end_user(body),
    )
    if services.capture is not None and body is not None:
        services.capture.offer(ctx, raw)  # opt-in; queued for its own thread, never in the way
    # Every forwarded request gets its row; only one with a model and a known
    # endpoint goes through the brain (tokenized, walked through the trie).
    metrics = services.metrics
    if metrics is not None:
        metrics.observe_phase("parse", ctx.start_s - received_s)
    entry = services.inflight.enter(ctx.request_id)
    track = RequestTrack(
        services, ctx, raw, entry, tracked=ctx.model is not None and endpoint != "other"
    )
    try:
        return await _send_and_relay(services, request, ctx, body, raw, track, received_s)
    except asyncio.CancelledError:
        if not entry.cut:
            # The server cancelled it (its own shutdown timeout): still a row.
            track.done(None, "cancelled", None, b"", "")
            raise
        # Ended by kvern's graceful shutdown before any byte was relayed.
        uncancel = getattr(asyncio.current_task(), "uncancel", None)
        if uncancel is not None:  # Python 3.11+: the cancellation is handled
            uncancel()
        error = ShuttingDown("kvern is shutting down: the request was ended after its grace")
        track.done(error.status_code, error.code, None, b"", "")
        return error_response(error)
    except BaseException:
        track.done(None, "internal_error", None, b"", "")
        raise


async def _send_and_relay(
    services: Services,
    request: Request,
    ctx: RequestContext,
    body: dict[str, Any] | None,
    raw: bytes,
    track: RequestTrack,
    received_s: float,
) -> Response:
    if services.inflight.cutting:
        raise asyncio.CancelledError()  # arrived after the grace: ended as the others were
    routing_s = time.perf_counter()
    try:
        route = await services.router.route(ctx, body, request.headers, raw)
    except KvernError as exc:  # no upstream to send it to: still one analytics row
        ctx.upstream = "-"
        track.done(exc.status_code, exc.code, None, b"", "")
        raise
    ctx.route_reason = route.choice.reason
    ctx.route_load = route.choice.load
    ctx.route_expected_ms = route.choice.expected_ms
    headers_out = forward_headers(request.headers.raw)
    metrics = services.metrics
    if metrics is not None:
        # kvern's own time before the upstream is asked: what it adds to TTFB.
        sent_s = time.perf_counter()
        metrics.observe_phase("route", sent_s - routing_s)
        metrics.observe_phase("total", sent_s - received_s)
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
    services.inflight.relaying(track.entry, attempt.response)
    headers = response_headers(attempt.response.headers)
    headers["x-kvern-request-id"] = ctx.request_id
    headers["x-kvern-upstream"] = attempt.route.replica.name
    if attempt.is_stream:
        return relay_stream(services, ctx, attempt, headers, track)
    return await relay_whole(services, ctx, attempt, headers, track)


def add_proxy_routes(app: Starlette) -> None:
    """Register the pass-through routes (last, so kvern's own endpoints win)."""
    app.add_route("/v1/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    app.add_route(
        "/api/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    )
