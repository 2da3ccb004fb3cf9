"""``GET /analytics``: hit rate, token reuse, predicted vs reported cache, latency.

Query parameters: ``window`` (1h, 24h, 7d, all), ``model`` (one model only),
``bucket`` (seconds per time bucket; adds a time series), ``wait_s`` (how
long to wait for tracking; default ``tracking.drain_timeout_s``). Rows of
requests already answered are waited for, briefly, and the store is flushed,
so a user sees the request they just made; whatever tracking still holds
then (a tokenizer still loading, a backlog, a hung tracking process) is
reported in ``tracking`` instead of waited for. ``parity`` is the latest
tokenizer/template parity check per model and upstream, whatever the window.
``rules_changes``: each live reload of the normalization rules in the window
(``ts_s``, the model keys whose rules changed, ``rules_hash``), to compare
the figures before and after.
Groups: ``by_tenant`` (the API key), ``by_end_user`` (the body's ``user``
field), ``by_model``, ``by_upstream``; ``routing`` only with several upstreams.
``ttfb_by_hit``: time to first byte of hits against misses (requests and
percentiles), overall and, with ``bucket``, per bucket.
``miss_reasons``: prompt tokens reused, novel, and per reason (cold,
below_block, diverged; evicted, routed_away, unreported) the requests and
tokens -- they add up (``adds_up``). ``misses``: the ``top_sites`` (10)
divergence sites by tokens lost, each with where it falls, two examples
side by side (the differing span in brackets) and ``advice``: a suggested
normalization rule in config.yaml's form, measured by replaying the site's
recent prompts (see :mod:`kvern.diagnosis`).
``capacity_curve``: per model, the token reuse an LRU prefix cache of each
capacity would reach on the prompts tracked since the tracking process
started (not windowed; see :mod:`kvern.tracking.capacity`); null, with
``capacity_curve_error`` saying why, when the brain does not answer in time.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from kvern.analytics import queries, routing_rows
from kvern.analytics.calibration import calibration
from kvern.analytics.events import rules_changes
from kvern.analytics.latency import ttfb_by_hit
from kvern.analytics.misses import miss_reasons
from kvern.analytics.parity_rows import latest_parity
from kvern.errors import BadRequest
from kvern.routes.misses import TOP_SITES, misses_view
from kvern.services import Services
from kvern.tracking.relay_view import MAX_DRAIN_WAIT_S, BrainUnavailable

router = APIRouter()

# How long the capacity curve is waited for: it is read ahead of any backlog.
CAPACITY_CURVE_TIMEOUT_S = 2.0


async def capacity_curve(
    services: Services, model: str | None, silent: str | None
) -> tuple[Any, str | None]:
    """The brain's live capacity curve, or None and why not (off, down, slow): never a 5xx.

    ``silent``: why the brain did not answer the drain just before; it is
    not asked again (each question would add its own timeout to the answer).
    """
    if not services.config.tracking.capacity_curve_max_blocks:
        return None, "off (tracking.capacity_curve_max_blocks is 0)"
    if silent is not None:
        return None, silent
    try:
        found = await services.tracker.call(
            "capacity_curve", model, timeout_s=CAPACITY_CURVE_TIMEOUT_S
        )
    except BrainUnavailable as exc:
        return None, str(exc)
    return found, None


@router.get("/analytics")
async def analytics(
    request: Request,
    window: str = "24h",
    model: str | None = None,
    bucket: int | None = Query(None, ge=1, le=30 * 86400),
    wait_s: float | None = Query(None, ge=0, le=MAX_DRAIN_WAIT_S),
    top_sites: int = Query(TOP_SITES, ge=0, le=100),
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
    # delays this answer by at most wait_s, and the answer says what is left).
    tracking = await services.tracker.drain_state(wait_s)
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
        "by_end_user": await queries.breakdown(
            store, by="end_user", window=window, model=model, now_s=now
        ),
        "by_upstream": await queries.breakdown(
            store, by="upstream", window=window, model=model, now_s=now
        ),
        "calibration": await calibration(store, window=window, model=model, now_s=now),
        # Time to first byte of hits against misses; per bucket with ?bucket=.
        "ttfb_by_hit": await ttfb_by_hit(
            store, window=window, model=model, bucket_s=bucket, now_s=now
        ),
        "parity": await latest_parity(store, model=model),
        # Why tokens were not reused (they add up), and the costliest divergence sites.
        "miss_reasons": await miss_reasons(store, window=window, model=model, now_s=now),
        "misses": await misses_view(
            store,
            services.tracker,
            window=window,
            model=model,
            now_s=now,
            top=top_sites,
            silent=tracking.error,
        ),
        # When config.yaml's normalization rules were reloaded (the dashboard marks each).
        "rules_changes": await rules_changes(store, window=window, now_s=now),
        "store": store.stats(),
        "tracking_drained": tracking.drained,
        "tracking": tracking.to_dict(),
    }
    out["capacity_curve"], out["capacity_curve_error"] = await capacity_curve(
        services, model, tracking.error
    )
    if len(services.pool) > 1:  # with one upstream there is no choice to report on
        out["routing"] = await routing_rows.routing(
            store, window=window, model=model, now_s=now
        )
    if bucket is not None:
        out["timeseries"] = await queries.timeseries(
            store, window=window, bucket_s=bucket, model=model, now_s=now
        )
    return out
