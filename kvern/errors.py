"""kvern's errors and the one place they become OpenAI-shaped responses.

Exception tree::

    KvernError                      -> the status and code it carries
    ├── BadRequest                  400 invalid_request_error (malformed JSON, missing fields)
    │   └── BodyTooLarge            400 invalid_request_error, code "body_too_large"
    └── UpstreamError               upstream problems, naming the upstream
        ├── UpstreamUnreachable     502 (connection refused, DNS, reset before a response)
        ├── UpstreamProtocolError   502 (the upstream broke the HTTP protocol)
        ├── UpstreamTimeout         504 (connect, read, write or pool timeout)
        └── NoHealthyUpstream       503 (every upstream's circuit is open)
    UpstreamsFailed                 the last failure's status: each upstream tried, and why
    ModelNotServed                  404 (no upstream serves the requested model)
    AdminKeyRequired                401 (an admin page without ``proxy.admin_api_key``)
    ShuttingDown                    503 (ended by a graceful shutdown after its grace)
    BodyReadTimeout                 408 (the client stalled while sending its body)

Why one place: clients use the OpenAI SDK, which reads ``error.message`` and
``error.type`` from the body. Every failure kvern itself produces must have
that shape and the right status, never a bare 500 or a traceback.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from kvern.config.urls import redact_text


class KvernError(Exception):
    """Base of every error kvern turns into a response."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (name, value)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(KvernError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(BadRequest):
    code = "body_too_large"


class UpstreamError(KvernError):
    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"

    def __init__(self, upstream: str, reason: str) -> None:
        # A transport message may quote a URL; its credentials never reach a client.
        reason = redact_text(reason)
        super().__init__(f"upstream {upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


class NoHealthyUpstream(KvernError):
    status_code = 503
    error_type = "upstream_error"
    code = "no_healthy_upstream"


class UpstreamsFailed(KvernError):
    """Every upstream tried failed before answering; the message names each one and why.

    Why not just the last failure: with one upstream refusing and another
    timing out, an operator reading only the last one looks in the wrong
    place. The status and code stay the last failure's, as clients saw before.
    """

    error_type = "upstream_error"

    def __init__(self, failures: list[KvernError]) -> None:
        assert failures, "at least one upstream was tried"
        last = failures[-1]
        tried = "; ".join(f.message for f in failures)
        super().__init__(f"all {len(failures)} upstreams tried failed: {tried}", code=last.code)
        self.status_code = last.status_code
        self.failures = failures


class ModelNotServed(KvernError):
    """No configured upstream lists the requested model (``upstreams[].models``)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_served"


class AdminKeyRequired(KvernError):
    """An admin page (/analytics, /trie/visualize, detailed /health) without the admin key."""

    status_code = 401
    error_type = "authentication_error"
    code = "admin_key_required"
    headers = (("www-authenticate", 'Bearer realm="kvern admin"'),)


class ShuttingDown(KvernError):
    """kvern ended the request: it is shutting down and ``proxy.shutdown_grace_s`` is over."""

    status_code = 503
    error_type = "server_error"
    code = "shutting_down"


class BodyReadTimeout(KvernError):
    """The client sent its headers, then stalled its body past ``proxy.body_read_timeout_s``."""

    status_code = 408
    error_type = "invalid_request_error"
    code = "body_read_timeout"
    headers = (("connection", "close"),)


class TrackingUnavailable(KvernError):
    """An admin read needs the brain (tracking's process), which is down or not answering."""

    status_code = 503
    error_type = "server_error"
    code = "tracking_unavailable"


def error_response(exc: KvernError) -> JSONResponse:
    """Render any :class:`KvernError` as the OpenAI error body with its status."""
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=dict(exc.headers))
