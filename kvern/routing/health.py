"""Active health checks, and the one place an upstream's health changes.

Why both active and passive: a request that cannot connect marks its upstream
at once (passive), so the next requests go elsewhere within the same second;
the periodic check (active) notices a replica that came back, or one that
died while idle, without a user request paying for it.

When a circuit opens, the upstream's presence is dropped from every model's
trie: a replica that went away usually comes back with an empty cache, and
routing prefixes to it as if it still held them would turn cache hits into
full prefills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import httpx

from kvern.config import HealthConfig
from kvern.routing.pool import Replica, UpstreamPool

logger = logging.getLogger(__name__)


class HealthMonitor:
    """Marks upstreams up or down from checks and from request outcomes."""

    def __init__(
        self,
        pool: UpstreamPool,
        config: HealthConfig,
        client: httpx.AsyncClient,
        *,
        on_down: Callable[[str], None],
        on_up: Callable[[str], None] | None = None,
        on_success: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.config = config
        self._client = client
        self._on_down = on_down
        self._on_up = on_up
        self._on_success = on_success  # every successful request or check, by name
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    # -- passive -----------------------------------------------------------------

    def failed(self, replica: Replica, reason: str) -> None:
        """A request or check could not use ``replica``."""
        if replica.breaker.failure(reason, self._clock()):
            logger.warning(
                "upstream %s marked down after %d failures: %s",
                replica.name,
                replica.breaker.consecutive_failures,
                reason,
            )
            self._on_down(replica.name)

    def succeeded(self, replica: Replica) -> None:
        breaker = replica.breaker
        # Back: its circuit was open, or (one upstream: it never opens) it had
        # failed as many times in a row as would have opened it.
        back = breaker.state != "closed" or (
            breaker.consecutive_failures >= self.config.failure_threshold
        )
        if back:
            logger.warning("upstream %s is back", replica.name)
        replica.breaker.success()
        if back and self._on_up is not None:
            self._on_up(replica.name)
        elif self._on_success is not None:
            self._on_success(replica.name)

    def acquire(self, replica: Replica) -> bool:
        """Permission to send to ``replica`` now (a half-open circuit lets one trial through)."""
        return replica.breaker.acquire(self._clock())

    # -- active ------------------------------------------------------------------

    def start(self) -> None:
        if self.config.interval_s > 0 and len(self.pool) > 1:
            self._task = asyncio.ensure_future(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.pool.replicas))
            await asyncio.sleep(self.config.interval_s)

    async def check(self, replica: Replica) -> bool:
        """One active check: a status below 500 within the timeout means up."""
        url = replica.upstream.base_url + self.config.path
        start = time.perf_counter()
        counters = replica.counters
        try:
            response = await self._client.get(url, timeout=self.config.timeout_s)
            ok = response.status_code < 500
            reason = f"health check answered {response.status_code}"
        except httpx.HTTPError as exc:
            ok = False
            reason = f"health check failed: {type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - a check never takes the monitor down
            ok = False
            reason = f"health check error: {type(exc).__name__}"
        counters.last_check_ms = round((time.perf_counter() - start) * 1000.0, 2)
        if ok:
            counters.checks_ok += 1
            counters.last_check_error = None
            self.succeeded(replica)
        else:
            counters.checks_failed += 1
            counters.last_check_error = reason
            self.failed(replica, reason)
        return ok
