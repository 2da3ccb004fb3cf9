"""``GET /health``: is kvern up, can it reach its upstream, how is each model tokenized.

``parity`` holds, per model, the latest check of kvern's rendering and
tokenization against the upstream's (see :mod:`kvern.parity`); ``null`` when
``tokenizers.parity_check`` is off, and a model appears once its check ended.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import httpx
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from kvern import __version__
from kvern.services import Services

router = APIRouter()

_PROBE_TIMEOUT_S = 2.0


async def probe_upstream(services: Services) -> dict[str, Any]:
    """GET the upstream's model list with a short timeout; any answer means reachable."""
    url = services.upstream.url_for("/v1/models")
    start = time.perf_counter()
    try:
        response = await services.client.get(url, timeout=_PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return {
            "name": services.upstream.name,
            "url": services.upstream.base_url,
            "reachable": False,
            "error": f"{type(exc).__name__}: {exc}"[:300],
        }
    return {
        "name": services.upstream.name,
        "url": services.upstream.base_url,
        "reachable": True,
        "status": response.status_code,
        "latency_ms": round((time.perf_counter() - start) * 1000.0, 2),
    }


def upstreams_view(services: Services) -> list[dict[str, Any]]:
    """Each upstream's circuit, load, counters and modelled cache, as /health shows them."""
    presence = services.tracker.presence
    by_model = presence.stats() if presence is not None else {}
    decode = services.config.routing.decode_load_tokens
    out = []
    for r in services.pool.replicas:
        load = r.load.snapshot()
        breaker = r.breaker
        out.append(
            {
                "name": r.name,
                "url": r.upstream.base_url,
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
                        "held_tokens": s.tokens,
                        "capacity_tokens": r.entry.kv_capacity_tokens,
                        "learned_capacity_tokens": round(s.budget),
                        "evicted_tokens": s.evicted_tokens,
                        "corrected_tokens": s.corrected_tokens,
                        "confirmed_misses": s.confirmed_misses,
                        "unexpected_hits": s.unexpected_hits,
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


@router.get("/health")
async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    tracker = services.tracker.stats
    if len(services.pool) > 1:
        upstreams = upstreams_view(services)
        healthy = sum(1 for u in upstreams if u["healthy"])
        status = "ok" if healthy == len(upstreams) else "degraded" if healthy else "down"
        upstream: dict[str, Any] = {"healthy": healthy, "total": len(upstreams)}
        routing: dict[str, Any] | None = {
            "policy": services.router.policy,
            "decision_timeouts": services.router.num_decision_timeouts,
            "decision_ms": _percentiles(list(services.router.decision_ms)),
            "upstreams": upstreams,
        }
    else:
        upstream = await probe_upstream(services)
        status = "ok" if upstream["reachable"] else "degraded"
        routing = None
    body = {
        "status": status,
        "version": __version__,
        "uptime_s": round(services.clock() - services.started_s, 3),
        "upstream": upstream,
        "routing": routing,
        "tokenizers": {
            s.model: {k: v for k, v in asdict(s).items() if k != "model"}
            for s in services.registry.states()
        },
        "tracking": {
            "tracked": tracker.num_tracked,
            "skipped_backlog": tracker.num_skipped_backlog,
            "untracked": tracker.num_untracked,
            "errors": dict(tracker.errors),
        },
        "analytics": services.store.stats() if services.store is not None else None,
        "parity": (
            {m: r.to_dict() for m, r in services.parity.reports().items()}
            if services.parity is not None
            else None
        ),
    }
    # 503 only when no upstream can take a request: load balancers and
    # readiness probes in front of kvern then stop sending to it.
    return JSONResponse(body, status_code=503 if status == "down" else 200)
