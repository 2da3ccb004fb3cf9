"""``GET /analytics``: hit rate, token reuse, predicted vs reported cache, latency.

Query parameters: ``window`` (1h, 24h, 7d, all), ``model`` (one model only),
``bucket`` (seconds per time bucket; adds a time series). The store is flushed
first so a user sees the request they just made. ``parity`` is the latest
tokenizer/template parity check per model and upstream, whatever the window.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from kvern.analytics import queries, routing_rows
from kvern.analytics.calibration import calibration
from kvern.analytics.parity_rows import latest_parity
from kvern.errors import BadRequest
from kvern.services import Services

router = APIRouter()


@router.get("/analytics")
async def analytics(
    request: Request,
    window: str = "24h",
    model: str | None = None,
    bucket: int | None = Query(None, ge=1, le=30 * 86400),
) -> dict[str, Any]:
    services: Services = request.app.state.services
    if window not in queries.WINDOWS:
        raise BadRequest(
            f"unknown window {window!r}; expected one of {', '.join(queries.WINDOWS)}",
            param="window",
        )
    store = services.store
    if store is None:
        raise BadRequest("analytics are disabled in the configuration (analytics.enabled)")
    # Rows of requests already answered land first (bounded: a slow brain
    # delays this answer by at most tracking.drain_timeout_s).
    drained = await services.tracker.drain()
    await store.flush()
    now = services.clock()
    out: dict[str, Any] = {
        "window": window,
        "model": model,
        "summary": await queries.summary(store, window=window, model=model, now_s=now),
        "by_model": await queries.breakdown(
            store, by="model", window=window, model=model, now_s=now
        ),
        "by_tenant": await queries.breakdown(
            store, by="tenant", window=window, model=model, now_s=now
        ),
        "by_upstream": await queries.breakdown(
            store, by="upstream", window=window, model=model, now_s=now
        ),
        "calibration": await calibration(store, window=window, model=model, now_s=now),
        "routing": await routing_rows.routing(store, window=window, model=model, now_s=now),
        "parity": await latest_parity(store, model=model),
        "store": store.stats(),
        "tracking_drained": drained,
    }
    if bucket is not None:
        out["timeseries"] = await queries.timeseries(
            store, window=window, bucket_s=bucket, model=model, now_s=now
        )
    return out
