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


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    upstream = await probe_upstream(services)
    tracker = services.tracker.stats
    return {
        "status": "ok" if upstream["reachable"] else "degraded",
        "version": __version__,
        "uptime_s": round(services.clock() - services.started_s, 3),
        "upstream": upstream,
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
