"""``GET /metrics``: Prometheus text (or OpenMetrics) for the relay and the brain together.

Mounted behind the admin key when one is set (a scraper sends it as
``Authorization: Bearer``; see ``deploy/prometheus/prometheus.yml``). What
the series mean is in :mod:`kvern.metrics`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from kvern.errors import BadRequest
from kvern.metrics.live import LiveSources
from kvern.metrics.scrape import scrape
from kvern.services import Services

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.metrics is None:
        raise BadRequest("metrics are disabled in the configuration (metrics.enabled)")
    sources = LiveSources(
        pool=services.pool,
        brain=services.tracker.stats,
        inflight=services.inflight,
        store=services.store,
        parity=services.parity,
        decode_load_tokens=services.config.routing.decode_load_tokens,
        started_s=services.started_s,
        capture=services.capture,
        shared_load=services.shared_load,
    )
    body, content_type = await scrape(
        services.metrics, sources, services.tracker, request.headers.get("accept")
    )
    return Response(body, media_type=content_type)
