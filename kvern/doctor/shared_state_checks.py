"""Doctor: ``routing.shared_state`` -- the Redis (or Valkey) that several kvern instances share.

Why these lines: with the store unreachable every instance still serves, but
routes on its own load only (``fail_open`` in ``/health``), which looks like
working and is not what was configured. So the doctor does what an
instance's link does (:class:`kvern.routing.shared_state.LinkThread`): the
same redis-py client, the same deadline (``shared_state_timeout_ms``, never
longer than the doctor's ``--timeout-s``), no retries -- then says how fast
the store answers against how often instances publish
(``shared_state_publish_ms``), and how many instances publish load under the
prefix right now, read from the very keys they write
(:func:`kvern.routing.shared_load.load_keys`; a stopped instance's key
expires). The URL is shown with its credentials replaced.

The round trips are blocking redis-py calls, run on a thread under an
overall deadline, so a store that hangs costs the doctor one deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from kvern.config import RoutingConfig
from kvern.config.urls import redact_text, redact_url
from kvern.doctor.report import Check, fail, ok, warn
from kvern.routing.shared_load import load_keys

SUBJECT = "shared state"
_INSTALL_FIX = "pip install 'kvern[redis]' (or unset routing.shared_state)"


@dataclass(frozen=True, slots=True)
class StoreFacts:
    """What one visit to the store found."""

    version: str  # "redis 7.0.15", "valkey 8.0.1"
    round_trip_ms: float  # one PING on an open connection
    publishing: int  # instances whose load key is alive under the prefix


def _server_version(info: dict[str, Any]) -> str:
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"redis {info.get('redis_version', '?')}"


def _visit(url: str, prefix: str, timeout_s: float) -> StoreFacts:
    """Connect, PING, read the version and count the instances publishing load (blocking)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    try:
        client.ping()  # connects (and authenticates)
        start = time.perf_counter()
        client.ping()
        round_trip_ms = (time.perf_counter() - start) * 1000
        version = _server_version(client.info("server"))
        key_prefix, members_key = load_keys(prefix)
        members = sorted(client.smembers(members_key))
        alive = client.mget([key_prefix + _text(m) for m in members]) if members else []
        return StoreFacts(version, round_trip_ms, sum(1 for v in alive if v is not None))
    finally:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _failure(shown: str, exc: Exception, timeout_ms: float) -> Check:
    """The store did not answer as it should: why, in kvern's words, and what to check."""
    import redis

    said = redact_text(f"{type(exc).__name__}: {exc}")[:300]
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in said or "WRONGPASS" in said:
        return fail(
            SUBJECT,
            f"{shown}: authentication refused ({said})",
            "check the user and password in routing.shared_state (redis://user:pass@host:port/db)",
        )
    if isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return fail(
            SUBJECT,
            f"{shown}: no answer within {timeout_ms:g} ms ({said})",
            "check that the store is up and not overloaded, or raise "
            "routing.shared_state_timeout_ms",
        )
    if isinstance(exc, redis.ConnectionError):
        return fail(
            SUBJECT,
            f"{shown}: unreachable ({said})",
            "check the host, port and scheme of routing.shared_state and that redis-server "
            "(or valkey-server) runs there and accepts this machine",
        )
    return fail(
        SUBJECT,
        f"{shown}: the store refused ({said})",
        "check that routing.shared_state names a Redis or Valkey server and its db number",
    )


def _found(config: RoutingConfig, shown: str, facts: StoreFacts) -> list[Check]:
    publish_ms = config.shared_state_publish_ms
    trip = f"{facts.round_trip_ms:.1f} ms"
    checks: list[Check] = []
    if facts.round_trip_ms > publish_ms / 2:
        checks.append(
            warn(
                SUBJECT,
                f"{shown}: {facts.version}, round trip {trip}: more than half of "
                f"shared_state_publish_ms ({publish_ms:g} ms), so instances cannot publish "
                "their load as often as configured",
                "put the store nearer (same zone or host), or raise "
                "routing.shared_state_publish_ms (and shared_state_stale_ms with it)",
            )
        )
    else:
        checks.append(ok(SUBJECT, f"{shown}: {facts.version}, round trip {trip}"))
    prefix = config.shared_state_prefix
    if facts.publishing:
        noun = "instance" if facts.publishing == 1 else "instances"
        said = f"{facts.publishing} {noun} publishing load under prefix {prefix!r}"
    else:
        said = (
            f"no instance publishing load under prefix {prefix!r} yet "
            "(none is running, or they use another prefix)"
        )
    checks.append(ok(f"{SUBJECT} fleet", said))
    return checks


async def check_shared_state(config: RoutingConfig, *, timeout_s: float) -> list[Check]:
    """The store's lines; one ✓ "not used" when ``routing.shared_state`` is unset.

    ``timeout_s``: the doctor's own longest wait, which the store's deadline
    never exceeds.
    """
    url = config.shared_state
    if url is None:
        return [ok(SUBJECT, "not used (routing.shared_state unset): kvern routes on its own load")]
    shown = redact_url(url)
    try:
        import redis  # noqa: F401 - only to tell whether the extra is installed
    except ImportError:
        return [fail(SUBJECT, f"{shown}: the redis package is not installed", _INSTALL_FIX)]
    deadline_s = min(config.shared_state_timeout_ms / 1000.0, timeout_s)
    try:
        # Each socket operation has the deadline; the whole visit gets a few of them.
        facts = await asyncio.wait_for(
            asyncio.to_thread(_visit, url, config.shared_state_prefix, deadline_s),
            timeout=min(6 * deadline_s, timeout_s),
        )
    except Exception as exc:  # noqa: BLE001 - every failure of the store is reported
        return [_failure(shown, exc, deadline_s * 1000)]
    return _found(config, shown, facts)
