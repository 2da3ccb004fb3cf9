"""Where each request's row goes on the relay: the per-request series, then the store.

Why one sink: a row is counted in ``/metrics`` and written for ``/analytics``
at the same moment, from the same values, so the two agree on any trace.
Counting is guarded: nothing on the analytics side may fail a request or
lose the row's write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.analytics.store import AnalyticsStore
from kvern.metrics.requests import RequestMetrics

logger = logging.getLogger(__name__)


def row_sink(
    store: AnalyticsStore | None, metrics: RequestMetrics | None
) -> Callable[[RequestRecord], Any] | None:
    """The callable the brain's rows are handed to; None when nothing wants them."""
    if store is None and metrics is None:
        return None
    logged: list[bool] = [False]

    def sink(rec: RequestRecord) -> None:
        if metrics is not None:
            try:
                metrics.observe(rec)
            except Exception as exc:  # noqa: BLE001 - a series never costs a row
                if not logged[0]:
                    logged[0] = True
                    logger.warning("metrics: a row could not be counted (%s)", type(exc).__name__)
        if store is not None:
            store.record(rec)

    return sink
