"""The services one kvern process runs, built by the app's lifespan and passed to routes.

Why a container instead of globals: every service is created in
``create_app``'s lifespan from the config it is given, and torn down there,
so tests can build as many independent apps as they like in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from kvern.analytics.capture import Capture
from kvern.analytics.store import AnalyticsStore
from kvern.config import KvernConfig
from kvern.metrics.requests import RequestMetrics
from kvern.parity.reports import ParityReports
from kvern.prompt.tenants import TenantIds
from kvern.routes.inflight import InFlight
from kvern.routing.health import HealthMonitor
from kvern.routing.pool import UpstreamPool
from kvern.routing.router import Router
from kvern.routing.shared_load import SharedLoad
from kvern.tracking.backends import BackendWatch
from kvern.tracking.client import BrainClient
from kvern.upstream.client import Upstream


@dataclass(slots=True)
class Services:
    """Everything a route needs, owned by the app's lifespan."""

    config: KvernConfig  # the validated configuration
    upstream: Upstream  # the first upstream (parity checks, the single-upstream case)
    pool: UpstreamPool  # every upstream, with load and health
    router: Router  # picks an upstream per request
    health: HealthMonitor  # circuit breakers and active checks
    client: httpx.AsyncClient  # one pooled keep-alive client
    tracker: BrainClient  # the brain: tokenizers, tries, presence (its own process)
    store: AnalyticsStore | None  # None when analytics are disabled
    tenants: TenantIds  # keyed tenant ids (the secret beside the db, or configured)
    inflight: InFlight  # requests from arrival to their row (graceful shutdown)
    backends: BackendWatch  # what each upstream said about its cache (cache_model auto)
    clock: Callable[[], float] = time.time  # wall clock (injected in tests)
    started_s: float = 0.0  # when the app started
    parity: ParityReports | None = None  # None when tokenizers.parity_check is off
    metrics: RequestMetrics | None = None  # None when metrics.enabled is off
    capture: Capture | None = None  # None unless analytics.capture is set (prompt text!)
    shared_load: SharedLoad | None = None  # other instances' load (routing.shared_state)
