"""Series read at scrape time from the relay's live state: upstreams, tracking, the store.

Why read and not counted: these are state (in-flight requests, prefill tokens
waiting, a circuit's position, the store's queue) or counters another part
already keeps for ``/health``; reading them when Prometheus asks costs nothing
on the request path and can never drift from what ``/health`` says.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvern import __version__
from kvern.analytics.capture import Capture
from kvern.analytics.store import AnalyticsStore
from kvern.parity.reports import ParityReports
from kvern.routing.breaker import BreakerState
from kvern.routing.pool import UpstreamPool
from kvern.routing.shared_load import SharedLoad
from kvern.routing.shared_state import link_families
from kvern.tracking.relay_view import BrainStats

_CIRCUIT_STATES: tuple[str, ...] = get_args(BreakerState)


@dataclass(slots=True)
class LiveSources:
    """The relay's parts a scrape reads (passed in by the app; nothing global)."""

    pool: UpstreamPool
    brain: BrainStats
    inflight: Sized  # the requests in flight (kvern.routes.inflight.InFlight)
    store: AnalyticsStore | None
    parity: ParityReports | None
    decode_load_tokens: int
    started_s: float
    capture: Capture | None = None  # analytics.capture, when set
    shared_load: SharedLoad | None = None  # routing.shared_state, with several upstreams


def live_families(src: LiveSources, *, brain_answered: bool) -> list[Metric]:
    """Every live family, as of now (on the relay's loop)."""
    out: list[Metric] = []
    out.extend(_upstream_families(src.pool, src.decode_load_tokens))
    out.extend(_brain_families(src.brain, brain_answered))
    if src.store is not None:
        out.extend(_store_families(src.store))
    if src.parity is not None:
        out.append(_parity_family(src.parity))
    if src.capture is not None:
        out.extend(_capture_families(src.capture))
    if src.shared_load is not None:
        out.extend(link_families({"load": src.shared_load.view()}))
    in_flight = GaugeMetricFamily(
        "kvern_in_flight_requests", "Requests kvern holds, from arrival to their row"
    )
    in_flight.add_metric([], len(src.inflight))
    started = GaugeMetricFamily("kvern_start_time_seconds", "When this kvern started (Unix time)")
    started.add_metric([], src.started_s)
    build = GaugeMetricFamily(
        "kvern_build_info", "kvern's version and Python's; always 1", labels=["version", "python"]
    )
    build.add_metric([__version__, platform.python_version()], 1)
    out.extend((in_flight, started, build))
    return out


def _upstream_families(pool: UpstreamPool, decode_load_tokens: int) -> Iterable[Metric]:
    u = ["upstream"]
    in_flight = GaugeMetricFamily(
        "kvern_upstream_in_flight_requests", "Requests sent to the upstream and not over", labels=u
    )
    prefill = GaugeMetricFamily(
        "kvern_upstream_in_flight_prefill_tokens",
        "Prompt tokens sent to the upstream whose first byte has not come back (prefill queue)",
        labels=u,
    )
    decoding = GaugeMetricFamily(
        "kvern_upstream_decoding_requests", "Requests the upstream is generating for", labels=u
    )
    load = GaugeMetricFamily(
        "kvern_upstream_load_tokens",
        "The router's load figure: prefill tokens plus decoding requests at "
        "routing.decode_load_tokens each",
        labels=u,
    )
    healthy = GaugeMetricFamily(
        "kvern_upstream_healthy", "1 when the upstream's circuit is closed", labels=u
    )
    circuit = GaugeMetricFamily(
        "kvern_upstream_circuit_state",
        "1 for the circuit breaker's current state (closed, open, half_open)",
        labels=["upstream", "state"],
    )
    opened = CounterMetricFamily(
        "kvern_upstream_circuit_opened", "Times the upstream's circuit opened", labels=u
    )
    attempts = CounterMetricFamily(
        "kvern_upstream_attempts",
        "Attempts sent to the upstream, by outcome (ok, failed before relaying anything, "
        "failed over to another upstream, resent on a stale connection)",
        labels=["upstream", "outcome"],
    )
    checks = CounterMetricFamily(
        "kvern_upstream_health_checks",
        "Active health checks by outcome",
        labels=["upstream", "outcome"],
    )
    for r in pool.replicas:
        name = r.name
        snap = r.load.snapshot()
        in_flight.add_metric([name], snap.in_flight)
        prefill.add_metric([name], snap.prefill_tokens)
        decoding.add_metric([name], snap.decoding)
        load.add_metric([name], snap.tokens(decode_load_tokens))
        state = r.breaker.state
        healthy.add_metric([name], 1 if state == "closed" else 0)
        for s in _CIRCUIT_STATES:
            circuit.add_metric([name, s], 1 if s == state else 0)
        opened.add_metric([name], r.breaker.times_opened)
        c = r.counters
        attempts.add_metric([name, "ok"], max(0, c.requests - c.failures))
        attempts.add_metric([name, "failed"], c.failures)
        attempts.add_metric([name, "failover"], c.failovers)
        attempts.add_metric([name, "stale_retry"], c.stale_retries)
        checks.add_metric([name, "ok"], c.checks_ok)
        checks.add_metric([name, "failed"], c.checks_failed)
    return (in_flight, prefill, decoding, load, healthy, circuit, opened, attempts, checks)


def _brain_families(stats: BrainStats, answered: bool) -> Iterable[Metric]:
    up = GaugeMetricFamily(
        "kvern_brain_up",
        "1 when kvern's tracking process is up and answered this scrape (its families are here)",
    )
    up.add_metric([], 1 if stats.state == "up" and answered else 0)
    restarts = CounterMetricFamily(
        "kvern_brain_restarts", "Tracking processes started after the first (hung or died)"
    )
    restarts.add_metric([], stats.restarts)
    skipped = CounterMetricFamily(
        "kvern_tracking_skipped",
        "Requests passed through untracked, or tracking work not done, by reason",
        labels=["reason"],
    )
    skipped.add_metric(["queue_to_brain_full"], stats.skipped_backlog)
    skipped.add_metric(["brain_down"], stats.skipped_down)
    return (up, restarts, skipped)


def _store_families(store: AnalyticsStore) -> Iterable[Metric]:
    s = store.stats()
    depth = GaugeMetricFamily(
        "kvern_analytics_queue_depth", "Analytics rows queued for the SQLite writer"
    )
    depth.add_metric([], s["queued"])
    written = CounterMetricFamily("kvern_analytics_written", "Analytics rows written to SQLite")
    written.add_metric([], s["written"])
    dropped = CounterMetricFamily(
        "kvern_analytics_dropped",
        "Analytics rows not written, by reason (queue_full: the writer fell behind; "
        "write_failed: SQLite refused the batch)",
        labels=["reason"],
    )
    dropped.add_metric(["queue_full"], s["dropped"])
    dropped.add_metric(["write_failed"], s["lost"])
    errors = CounterMetricFamily("kvern_analytics_write_errors", "Failed SQLite batch writes")
    errors.add_metric([], s["write_errors"])
    return (depth, written, dropped, errors)


def _capture_families(capture: Capture) -> Iterable[Metric]:
    s = capture.stats()
    written = CounterMetricFamily(
        "kvern_capture_written", "Request bodies appended to the capture file (analytics.capture)"
    )
    written.add_metric([], s["written"])
    dropped = CounterMetricFamily(
        "kvern_capture_dropped",
        "Request bodies not captured, by reason (queue_full: the writer fell behind; "
        "disabled: a write error turned capture off)",
        labels=["reason"],
    )
    dropped.add_metric(["queue_full"], s["dropped_queue_full"])
    dropped.add_metric(["disabled"], s["dropped_disabled"])
    return (written, dropped)


def _parity_family(parity: ParityReports) -> Metric:
    family = GaugeMetricFamily(
        "kvern_parity_mismatch",
        "1 when the latest tokenizer/template parity check against the upstream found a "
        "difference (kvern's counts are then off), 0 when it matched",
        labels=["model", "upstream"],
    )
    for report in parity.reports().values():
        if report.status in ("match", "mismatch"):
            family.add_metric(
                [report.model, report.upstream], 1 if report.status == "mismatch" else 0
            )
    return family
