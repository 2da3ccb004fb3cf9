"""The application factory: ``create_app(config)`` builds kvern's ASGI app.

Every service is created in the lifespan and closed there, in reverse order:
the brain (tracking's own process) finishes what it holds and sends back the
last requests' rows, then the analytics store drains its queue to disk, then
the upstream client closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from kvern import __version__
from kvern.analytics.capture import Capture
from kvern.analytics.events import INSERT_EVENT_SQL, rules_changed
from kvern.analytics.store import AnalyticsStore
from kvern.analytics.tenant_secret import tenant_secret
from kvern.config import KvernConfig
from kvern.config.watch import Changes, ConfigSource, ConfigWatcher, listen_for_sighup, rules_hash
from kvern.errors import BadRequest, KvernError, error_response
from kvern.metrics.requests import RequestMetrics
from kvern.metrics.sink import row_sink
from kvern.parity.reports import ParityReports
from kvern.prompt.tenants import TenantIds
from kvern.routes import access_log
from kvern.routes import analytics as analytics_routes
from kvern.routes import dashboard as dashboard_routes
from kvern.routes import health as health_routes
from kvern.routes import metrics as metrics_routes
from kvern.routes import proxy as proxy_routes
from kvern.routes import tree as tree_routes
from kvern.routes import trie as trie_routes
from kvern.routes.admin import require_admin
from kvern.routes.inflight import InFlight
from kvern.routing.health import HealthMonitor
from kvern.routing.pool import UpstreamPool
from kvern.routing.router import Router
from kvern.routing.shared_load import SharedLoad
from kvern.routing.shared_state import require_redis
from kvern.services import Services
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.backends import BackendWatch
from kvern.tracking.client import BrainClient
from kvern.upstream.client import build_client

logger = logging.getLogger(__name__)

# How long the shutdown waits for requests still in flight to hand over their rows.
_LEAVE_TIMEOUT_S = 5.0


def create_app(
    config: KvernConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] | None = None,
    registry: TokenizerRegistry | None = None,
    source: ConfigSource | None = None,
) -> FastAPI:
    """Build the app. ``transport`` and ``clock`` are for tests (fault injection, time).

    ``registry`` (a tokenizer registry of the caller's) or a ``clock`` runs
    the brain on a thread of this process, where those objects live.
    ``source`` (``kvern serve --config``): the file ``config`` was loaded
    from, and how; it is watched (and reloaded on SIGHUP) and edits of the
    normalization rules apply live.
    """
    wall = clock or time.time
    require_redis(config.routing)  # routing.shared_state without redis-py: a ConfigError now
    access_log.install()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store: AnalyticsStore | None = None
        if config.analytics.enabled:
            a = config.analytics
            store = AnalyticsStore(
                a.db_path,
                batch_size=a.batch_size,
                flush_interval_ms=a.flush_interval_ms,
                queue_size=a.queue_size,
                retention_days=a.retention_days,
                clock=wall,
            )
            await store.start()
        capture: Capture | None = None
        if config.analytics.capture is not None:
            capture = Capture.from_config(
                config.analytics.capture.path, config.analytics.capture.max_mb
            )
            capture.start()  # a file it cannot open turns capture off (logged), not kvern
        metrics = RequestMetrics(config.metrics) if config.metrics.enabled else None
        client = build_client(config.upstream, transport)
        # What each upstream says about its cache fills what the config leaves
        # unset (cache_model.kind: auto); the brain starts with the result.
        backends = await BackendWatch.start(config, client)
        effective = backends.effective()
        pool = UpstreamPool(effective.upstream_entries(), effective.routing.health)
        upstream = pool.replicas[0].upstream
        parity: ParityReports | None = None
        brain = BrainClient(
            effective,
            record=row_sink(store, metrics),
            registry=registry,
            clock=wall,
        )
        backends.brain = brain
        if config.tokenizers.parity_check:
            parity = ParityReports(store, lambda: brain.call("parity_wait", timeout_s=600))
            brain.set_parity_sink(parity.receive)
        await brain.start()
        monitor = HealthMonitor(
            pool,
            config.routing.health,
            client,
            on_down=brain.drop_upstream,
            on_up=backends.came_back,
            on_success=backends.answered,
        )
        # Other kvern instances in front of the same upstreams: their load, read
        # in the background (routing.shared_state; nothing to share with one upstream).
        shared_load = (
            SharedLoad(pool, config.routing, clock=wall)
            if config.routing.shared_state is not None and len(pool) > 1
            else None
        )
        policy = config.routing_policy()
        router = Router(pool, config.routing, policy, brain, clock=wall, shared_load=shared_load)
        inflight = InFlight()
        app.state.services = Services(
            config=config,
            upstream=upstream,
            pool=pool,
            router=router,
            health=monitor,
            client=client,
            tracker=brain,
            store=store,
            tenants=TenantIds(tenant_secret(config.analytics)),
            backends=backends,
            inflight=inflight,
            clock=wall,
            started_s=wall(),
            parity=parity,
            metrics=metrics,
            capture=capture,
            shared_load=shared_load,
        )
        monitor.start()
        if shared_load is not None:
            shared_load.start()
        watcher: ConfigWatcher | None = None
        stop_listening: Callable[[], object] | None = None
        if source is not None:

            async def apply_rules(running: KvernConfig, found: Changes) -> None:
                """New rules for requests from now on; the mark in /analytics is this moment."""
                services = app.state.services
                ts_s = wall()
                services.config = services.config.model_copy(
                    update={"normalization": running.normalization}
                )
                await brain.set_normalization(running.normalization)
                if store is not None:
                    row = rules_changed(ts_s, found.rules_models, rules_hash(running))
                    await store.write_one(INSERT_EVENT_SQL, row)

            watcher = ConfigWatcher(source, config, apply_rules, poll_s=config.proxy.config_poll_s)
            watcher.start()
            stop_listening = listen_for_sighup(watcher.trigger)
        previous_interval = sys.getswitchinterval()
        if brain.stats.isolation == "thread":
            # Tracking then shares this process's GIL: hand it back to the relay sooner.
            sys.setswitchinterval(config.proxy.gil_switch_interval_ms / 1000.0)
        # Everything built so far (modules, services) lives as long as the app:
        # out of the collector's sight, a full collection under load scans only
        # what requests create, and stops every stream for a fraction as long.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            sys.setswitchinterval(previous_interval)
            # Requests still in flight (a server that cancelled them, a test
            # that stopped early) hand their rows over before tracking closes.
            if not await inflight.wait_empty(_LEAVE_TIMEOUT_S):
                logger.warning("%d request(s) still in flight at shutdown", len(inflight))
            if stop_listening is not None:
                stop_listening()
            if watcher is not None:
                await watcher.close()
            if capture is not None:
                await asyncio.to_thread(capture.close)  # what is queued is written first
            await monitor.close()
            if shared_load is not None:
                await asyncio.to_thread(shared_load.close)
            await backends.close()
            await brain.close()  # every row the brain holds comes back first
            if store is not None:
                await store.close()
            await client.aclose()

    app = FastAPI(
        title="kvern",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(KvernError)
    async def _kvern_error(request: Request, exc: KvernError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(BadRequest(f"invalid parameter {loc}: {first.get('msg', '')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found" if exc.status_code == 404 else None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error handling %s %s", request.method, request.url.path)
        body = {
            "error": {
                "message": f"internal error in kvern: {type(exc).__name__}",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
        return JSONResponse(body, status_code=500)

    # /health guards its own details (a bare liveness answer stays open);
    # every other kvern page is mounted behind the admin key.
    admin = [Depends(require_admin)]
    app.include_router(health_routes.router)
    app.include_router(analytics_routes.router, dependencies=admin)
    app.include_router(trie_routes.router, dependencies=admin)
    app.include_router(tree_routes.router, dependencies=admin)
    # The page holds no data (it asks the admin pages above, with the key): open.
    app.include_router(dashboard_routes.router)
    app.include_router(metrics_routes.router, dependencies=admin)
    proxy_routes.add_proxy_routes(app)
    return app
