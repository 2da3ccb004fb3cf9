"""``GET /health``: is kvern up, can it reach its upstream, how is each model tokenized.

``parity`` holds, per model, the latest check of kvern's rendering and
tokenization against the upstream's (see :mod:`kvern.parity`); ``null`` when
``tokenizers.parity_check`` is off, and a model appears once its check ended.
``tokenizer_hub`` is the one check of the tokenizer hub (see
:mod:`kvern.tokenize.hub`). It answers within about a second whatever
tracking does: the brain's figures are asked for with a short timeout, and
a brain that does not answer in time is reported, not waited for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from kvern import __version__
from kvern.routes.admin import is_admin
from kvern.services import Services
from kvern.tracking.relay_view import BrainUnavailable

router = APIRouter()

_PROBE_TIMEOUT_S = 2.0
# /health answers even when the brain is slow: it waits this long for its figures.
_BRAIN_TIMEOUT_S = 1.0


async def probe_upstream(services: Services) -> dict[str, Any]:
    """GET the upstream's model list with a short timeout; any answer means reachable."""
    url = services.upstream.url_for("/v1/models")
    start = time.perf_counter()
    try:
        response = await services.client.get(url, timeout=_PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return {
            "name": services.upstream.name,
            "url": services.upstream.shown_url,
            "reachable": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
        }
    return {
        "name": services.upstream.name,
        "url": services.upstream.shown_url,
        "reachable": True,
        "status": response.status_code,
        "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
    }


def upstreams_view(
    services: Services, by_model: dict[str, dict[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Each upstream's circuit, load, counters and modelled cache, as /health shows them.

    ``by_model``: the brain's presence figures, model -> upstream -> counters.
    """
    decode = services.config.routing.decode_load_tokens
    out = []
    for r in services.pool.replicas:
        load = r.load.snapshot()
        breaker = r.breaker
        out.append(
            {
                "name": r.name,
                "url": r.upstream.shown_url,
                "healthy": breaker.state == "closed",
                "circuit": breaker.state,
                "consecutive_failures": breaker.consecutive_failures,
                "last_error": breaker.last_error,
                "times_opened": breaker.times_opened,
                "load": {
                    "in_flight": load.in_flight,
                    "prefill_tokens": load.prefill_tokens,
                    "decoding": load.decoding,
                    "tokens": load.tokens(decode),
                },
                "requests": r.counters.requests,
                "failures": r.counters.failures,
                "failovers": r.counters.failovers,
                "stale_retries": r.counters.stale_retries,
                "checks": {
                    "ok": r.counters.checks_ok,
                    "failed": r.counters.checks_failed,
                    "last_ms": r.counters.last_check_ms,
                    "last_error": r.counters.last_check_error,
                },
                "models": list(r.entry.models),
                "weight": r.entry.weight,
                "max_concurrency": r.entry.max_concurrency,
                "cache": {
                    model: {
                        "held_tokens": s["tokens"],
                        "capacity_tokens": r.entry.kv_capacity_tokens,
                        "learned_capacity_tokens": round(s["budget"]),
                        "evicted_tokens": s["evicted_tokens"],
                        "corrected_tokens": s["corrected_tokens"],
                        "confirmed_misses": s["confirmed_misses"],
                        "unexpected_hits": s["unexpected_hits"],
                    }
                    for model, stats in by_model.items()
                    if (s := stats.get(r.name)) is not None
                },
            }
        )
    return out


def _percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of the recent decision waits (ms); None before the first."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], 3)}


async def brain_view(services: Services) -> dict[str, Any]:
    """The brain's figures, or an empty view saying why there are none (never waits long)."""
    brain = services.tracker
    try:
        view: dict[str, Any] = await brain.call("health", timeout_s=_BRAIN_TIMEOUT_S)
    except BrainUnavailable as exc:
        return {"tokenizers": {}, "tracking": {}, "presence": {}, "error": str(exc)}
    return view


def liveness(services: Services) -> Response:
    """The bare answer for probes without the admin key: up, and whether any upstream is.

    Computed from the circuit breakers alone: an anonymous probe never makes
    kvern send anything upstream, and learns nothing but the status.
    """
    healthy = sum(1 for r in services.pool.replicas if r.breaker.state != "open")
    status = "ok" if healthy == len(services.pool) else "degraded" if healthy else "down"
    return JSONResponse({"status": status}, status_code=503 if status == "down" else 200)


@router.get("/health")
async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    if not is_admin(request):
        return liveness(services)
    brain = services.tracker
    # Both bounded, and asked at once: the answer never waits for one after the other.
    probing = None if len(services.pool) > 1 else asyncio.ensure_future(probe_upstream(services))
    view = await brain_view(services)
    if probing is None:
        upstreams = upstreams_view(services, view["presence"])
        healthy = sum(1 for u in upstreams if u["healthy"])
        status = "ok" if healthy == len(upstreams) else "degraded" if healthy else "down"
        upstream: dict[str, Any] = {"healthy": healthy, "total": len(upstreams)}
        routing: dict[str, Any] | None = {
            "policy": services.router.policy,
            "decision_timeouts": services.router.num_decision_timeouts,
            "decision_ms": _percentiles(list(services.router.decision_ms)),
            # Requests that waited for a prefix their upstream was still computing.
            "in_flight_waits": services.router.num_in_flight_waits,
            "in_flight_wait_ms": _percentiles(list(services.router.in_flight_wait_ms)),
            "upstreams": upstreams,
            # routing.shared_state: the other instances' load (relay) and presence (brain).
            "shared_state": (
                {"load": services.shared_load.view(), "presence": view.get("shared_state")}
                if services.shared_load is not None
                else None
            ),
            # upstreams[].kv_events: per upstream, its events' presence and counters.
            "kv_events": view.get("kv_events") or None,
        }
    else:
        upstream = await probing
        only = services.pool.replicas[0]
        upstream["stale_retries"] = only.counters.stale_retries
        # Load and circuit as with several upstreams (the dashboard's card, /metrics agree).
        snap = only.load.snapshot()
        upstream["circuit"] = only.breaker.state
        upstream["load"] = {
            "in_flight": snap.in_flight,
            "prefill_tokens": snap.prefill_tokens,
            "decoding": snap.decoding,
            "tokens": snap.tokens(services.config.routing.decode_load_tokens),
        }
        status = "ok" if upstream["reachable"] else "degraded"
        routing = None
    if brain.stats.state != "up" and status == "ok":
        status = "degraded"  # requests flow, untracked
    approximate = sorted(m for m, t in view["tokenizers"].items() if t.get("kind") == "fallback")
    if approximate and status == "ok":
        status = "degraded"  # requests flow, but these models' figures are estimates
    tracking = {
        "tracked": 0,
        "skipped_backlog": 0,
        "untracked": 0,
        "skipped": {},
        "errors": {},
        **view["tracking"],
    }
    relay = brain.stats
    tracking["skipped_backlog"] += relay.skipped_backlog
    tracking["skipped_brain_down"] = relay.skipped_down
    tracking["brain"] = {
        "state": relay.state,
        "isolation": relay.isolation,
        "pid": relay.pid,
        "restarts": relay.restarts,
        "last_exit": relay.last_exit,
        "late_answers": relay.late_answers,
        "rows_untracked": brain.pending.num_untracked,
        "rows_pending": brain.pending.num_owed,
        "in_flight": len(brain.pending),
        "queued": brain.queued,
        "error": view.get("error"),
    }
    body = {
        "status": status,
        "version": __version__,
        "uptime_s": round(services.clock() - services.started_s, 3),
        "upstream": upstream,
        "routing": routing,
        "tokenizers": view["tokenizers"],
        "approximate_tokenizers": approximate,
        # What each upstream said about its cache, and the cache model kvern runs for it.
        "backends": services.backends.view(),
        # Whether hub ids can be fetched: "unreachable" names the endpoint and why.
        "tokenizer_hub": view.get("tokenizer_hub"),
        "tracking": tracking,
        "analytics": _analytics(services),
        "parity": (
            {m: r.to_dict() for m, r in services.parity.reports().items()}
            if services.parity is not None
            else None
        ),
    }
    # 503 only when no upstream can take a request: load balancers and
    # readiness probes in front of kvern then stop sending to it.
    return JSONResponse(body, status_code=503 if status == "down" else 200)


def _analytics(services: Services) -> dict[str, Any] | None:
    """The store's counters, and capture's when it is on (None when neither runs)."""
    out: dict[str, Any] | None = services.store.stats() if services.store is not None else None
    if services.capture is not None:
        out = {**(out or {"enabled": False}), "capture": services.capture.stats()}
    return out
