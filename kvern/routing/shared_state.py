"""The link to the store several kvern instances share (Redis or Valkey): deadlines, backoff, state.

Why a thread of its own per task, with blocking calls: nothing a user waits
for may ever await the store. Each task (publishing load, the presence
stream's writer and reader) runs on a daemon thread with a blocking redis-py
client whose every socket operation has a hard deadline
(``routing.shared_state_timeout_ms``); what the request path reads is a local
copy the thread refreshes. A store that is down, refuses or hangs costs that
thread a timeout and a reconnect with backoff, and the copy goes stale: the
readers then fail open to local state and count it. Neither the relay's event
loop nor the brain's tracking thread is ever on the wire.

Why redis-py is optional: one instance needs no shared state, and the
package is only imported when ``routing.shared_state`` is set
(``pip install 'kvern[redis]'``); without it, start-up stops with that advice.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvern.config import ConfigError, RoutingConfig
from kvern.config.urls import redact_text, redact_url

logger = logging.getLogger(__name__)

# Reconnect backoff: doubles from the first to the last, with jitter, so a
# fleet does not reconnect in lock step after the store comes back.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


def require_redis(config: RoutingConfig) -> Any:
    """The ``redis`` module when ``routing.shared_state`` is set (None when it is not).

    Raises :class:`ConfigError` naming the key and the extra to install, so
    ``kvern serve`` stops with one clear line instead of a traceback later.
    """
    if config.shared_state is None:
        return None
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "routing.shared_state is set but the redis package is not installed: "
            "pip install 'kvern[redis]' (or unset routing.shared_state)"
        ) from None
    return redis


def instance_id() -> str:
    """This process's name in the shared store: host, pid and a random tail (restarts differ)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(slots=True)
class LinkStats:
    """One link's state and counters, for ``/health`` and ``/metrics``."""

    connected: bool = False  # the last round trip succeeded
    last_ok_mono_s: float | None = None  # when (time.monotonic) it did
    errors: int = 0  # round trips that failed or ran past the deadline
    reconnects: int = 0  # connections made after the first
    last_error: str | None = None  # the latest failure (type and message, credentials out)


class LinkThread:
    """A daemon thread running ``step`` against the store, reconnecting with backoff on failure.

    ``step(client)`` does one round of work (and paces itself: a sleep on
    :meth:`wait`, a blocking read); any exception it raises counts an error,
    drops the connection and backs off. ``on_connect(client)`` runs after
    each (re)connection, before the next step. ``read_s`` extends the read
    deadline for a step that blocks on the server on purpose (XREAD BLOCK).
    """

    def __init__(self, config: RoutingConfig, *, name: str, read_s: float = 0.0) -> None:
        redis = require_redis(config)
        assert redis is not None and config.shared_state is not None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        timeout_s = config.shared_state_timeout_ms / 1000.0
        self.url = redact_url(config.shared_state)
        # No retries inside redis-py: each failure must reach the backoff
        # below at once, and a command never takes longer than its deadline.
        self.client = redis.Redis.from_url(
            config.shared_state,
            socket_timeout=timeout_s + read_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.stats = LinkStats()
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._connected_once = False

    # -- to override -----------------------------------------------------------

    def step(self, client: Any) -> None:
        raise NotImplementedError

    def on_connect(self, client: Any) -> None:
        """After each (re)connection; nothing by default."""

    # -- running -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (it ends within one deadline) and close the client."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.client.close()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the link is being closed."""
        return self._stop.wait(seconds)

    def age_s(self) -> float:
        """Seconds since the last successful round trip (inf: never)."""
        ok = self.stats.last_ok_mono_s
        return float("inf") if ok is None else time.monotonic() - ok

    def _run(self) -> None:
        backoff_s = BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                if not self.stats.connected:
                    self.client.ping()
                    self.on_connect(self.client)
                    self._connected(time.monotonic())
                self.step(self.client)
                self.stats.last_ok_mono_s = time.monotonic()
                backoff_s = BACKOFF_FIRST_S
            except Exception as exc:  # noqa: BLE001 - the store failing never stops the link
                self._failed(exc)
                try:
                    self.client.connection_pool.disconnect()
                except Exception:  # noqa: BLE001 - a socket already gone
                    pass
                if self.wait(backoff_s * (0.5 + random.random())):
                    break
                backoff_s = min(BACKOFF_MAX_S, backoff_s * 2)

    def _connected(self, now_mono: float) -> None:
        if self._connected_once:
            self.stats.reconnects += 1
            logger.info("shared state (%s): reconnected to %s", self.name, self.url)
        self._connected_once = True
        self.stats.connected = True
        self.stats.last_ok_mono_s = now_mono

    def _failed(self, exc: Exception) -> None:
        stats = self.stats
        stats.errors += 1
        stats.last_error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
        if stats.connected or stats.errors == 1:
            logger.warning(
                "shared state (%s): %s; routing on local state until %s answers",
                self.name,
                stats.last_error,
                self.url,
            )
        stats.connected = False


def link_view(link: LinkThread, stale_s: float, **counters: int) -> dict[str, Any]:
    """A link as ``/health`` shows it; ``counters`` are the caller's (fail_open, dropped, ...)."""
    age = link.age_s()
    return {
        "url": link.url,
        "connected": link.stats.connected,
        "last_ok_age_s": None if age == float("inf") else round(age, 3),
        "stale": age > stale_s,
        "errors": link.stats.errors,
        "reconnects": link.stats.reconnects,
        "last_error": link.stats.last_error,
        **counters,
    }


def link_families(views: dict[str, dict[str, Any]]) -> list[Metric]:
    """``/metrics`` families per part (``load`` in the relay, ``presence`` in the brain).

    The relay and the brain each report their parts under the same names;
    the scrape merges them into one family per name.
    """
    part = ["part"]
    connected = GaugeMetricFamily(
        "kvern_shared_state_connected",
        "1 when the link to routing.shared_state answered its last round trip",
        labels=part,
    )
    stale = GaugeMetricFamily(
        "kvern_shared_state_stale",
        "1 when what was read from routing.shared_state is older than shared_state_stale_ms "
        "(routing then goes by this instance's own state)",
        labels=part,
    )
    age = GaugeMetricFamily(
        "kvern_shared_state_last_ok_age_seconds",
        "Seconds since the link's last successful round trip (absent before the first)",
        labels=part,
    )
    errors = CounterMetricFamily(
        "kvern_shared_state_errors",
        "Round trips to routing.shared_state that failed or ran past shared_state_timeout_ms",
        labels=part,
    )
    reconnects = CounterMetricFamily(
        "kvern_shared_state_reconnects", "Connections made after the first", labels=part
    )
    fail_open = CounterMetricFamily(
        "kvern_shared_state_fail_open",
        "Routing decisions (load) or presence lookups (presence) made while the shared view "
        "was stale: local state only, or what was shared before",
        labels=part,
    )
    dropped = CounterMetricFamily(
        "kvern_shared_state_dropped",
        "Updates this instance did not publish (hand-off queue full, or the store failed)",
        labels=part,
    )
    for name, view in views.items():
        connected.add_metric([name], 1 if view["connected"] else 0)
        stale.add_metric([name], 1 if view["stale"] else 0)
        if view["last_ok_age_s"] is not None:
            age.add_metric([name], view["last_ok_age_s"])
        errors.add_metric([name], view["errors"])
        reconnects.add_metric([name], view["reconnects"])
        fail_open.add_metric([name], view.get("fail_open", 0))
        dropped.add_metric([name], view.get("dropped", 0))
    return [connected, stale, age, errors, reconnects, fail_open, dropped]
