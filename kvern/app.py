"""The application factory: ``create_app(config)`` builds kvern's ASGI app.

Every service is created in the lifespan and closed there, in reverse order:
parity checks still running are cancelled, tracking is drained (so the last
requests' rows exist), then the analytics store drains its queue to disk, then
the upstream client closes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from kvern import __version__
from kvern.analytics.store import AnalyticsStore
from kvern.config import KvernConfig
from kvern.errors import BadRequest, KvernError, error_response
from kvern.parity.checker import ParityChecker
from kvern.routes import analytics as analytics_routes
from kvern.routes import health as health_routes
from kvern.routes import proxy as proxy_routes
from kvern.routes import trie as trie_routes
from kvern.routing.book import PresenceBook
from kvern.routing.health import HealthMonitor
from kvern.routing.pool import UpstreamPool
from kvern.routing.router import Router
from kvern.services import Services
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.forest import TrieForest
from kvern.tracking.tracker import Tracker
from kvern.upstream.client import build_client

logger = logging.getLogger(__name__)


def create_app(
    config: KvernConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] | None = None,
    registry: TokenizerRegistry | None = None,
) -> FastAPI:
    """Build the app. ``transport`` and ``clock`` are for tests (fault injection, time)."""
    wall = clock or time.time

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
        pool = UpstreamPool(config.upstream_entries(), config.routing.health)
        upstream = pool.replicas[0].upstream
        several = len(pool) > 1
        presence = (
            PresenceBook(
                pool.caches(),
                learn=config.routing.learn_capacity,
                trusted_before=lambda name: pool.by_name[name].load.oldest_awaiting(),
            )
            if several
            else None
        )
        held_together = sum(r.entry.kv_capacity_tokens for r in pool.replicas) if several else 0
        forest = TrieForest(
            config.trie,
            config.eviction,
            config.upstream.cache_model,
            min_max_tokens=held_together + held_together // 4,
        )
        tokenizers = registry or TokenizerRegistry(
            config.tokenizers, upstream_origin=upstream.origin
        )
        tracker = Tracker(
            config,
            registry=tokenizers,
            forest=forest,
            record=store.record if store is not None else None,
            clock=wall,
            # With several upstreams some request nearly always awaits its
            # first byte; a long step-aside would starve tracking and routing.
            max_yield_s=0.005 if several else 0.05,
            presence=presence,
        )
        client = build_client(config.upstream, transport)

        def on_down(name: str) -> None:
            if presence is not None:
                tracker.in_thread_soon(presence.drop_upstream, name)

        monitor = HealthMonitor(pool, config.routing.health, client, on_down=on_down)
        router = Router(pool, config.routing, config.routing_policy(), tracker, clock=wall)
        parity: ParityChecker | None = None
        previous_on_loaded = tokenizers.on_loaded
        if config.tokenizers.parity_check:
            # Rendering runs on the tracking thread, which owns the tokenizers' caches.
            parity = ParityChecker(
                client=client,
                upstream=upstream,
                store=store,
                run_sync=tracker.in_thread,
                clock=wall,
            )
            tokenizers.on_loaded = parity.on_loaded
            parity.start(tokenizers, config.tokenizers.models)
        app.state.services = Services(
            config=config,
            upstream=upstream,
            pool=pool,
            router=router,
            health=monitor,
            client=client,
            registry=tokenizers,
            forest=forest,
            tracker=tracker,
            store=store,
            clock=wall,
            started_s=wall(),
            parity=parity,
        )
        monitor.start()
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(config.proxy.gil_switch_interval_ms / 1000.0)
        try:
            yield
        finally:
            sys.setswitchinterval(previous_interval)
            await monitor.close()
            if parity is not None:
                await parity.close()
                tokenizers.on_loaded = previous_on_loaded
            await tracker.close()
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

    app.include_router(health_routes.router)
    app.include_router(analytics_routes.router)
    app.include_router(trie_routes.router)
    proxy_routes.add_proxy_routes(app)
    return app
