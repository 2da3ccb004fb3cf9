"""Per-request analytics: records, their SQLite store, and the /analytics queries.

The request path only calls :meth:`AnalyticsStore.record` (synchronous, never
blocks); one writer task batches rows into SQLite; :mod:`kvern.analytics.queries`
aggregates them in SQL for the endpoint.
"""

from __future__ import annotations

from kvern.analytics.queries import (
    GROUP_COLUMNS,
    PERCENTILES,
    WINDOWS,
    Reader,
    breakdown,
    summary,
    timeseries,
)
from kvern.analytics.records import COLUMNS, RequestRecord, from_row, to_row
from kvern.analytics.schema import MIGRATIONS, SCHEMA_VERSION, SchemaTooNewError, migrate
from kvern.analytics.store import AnalyticsStore

__all__ = [
    "COLUMNS",
    "GROUP_COLUMNS",
    "MIGRATIONS",
    "PERCENTILES",
    "SCHEMA_VERSION",
    "WINDOWS",
    "AnalyticsStore",
    "Reader",
    "RequestRecord",
    "SchemaTooNewError",
    "breakdown",
    "from_row",
    "migrate",
    "summary",
    "timeseries",
    "to_row",
]
