"""Rows of the ``parity_checks`` table: what the store writes and what /analytics reads.

Why a module apart from :mod:`kvern.analytics.records`: a parity check is not
a request. It happens once per model and upstream (see :mod:`kvern.parity`),
so its rows are written one at a time by
:meth:`kvern.analytics.store.AnalyticsStore.write_parity` rather than through
the request batcher, and /analytics shows only the latest one per model and
upstream. This module knows nothing of how a check is made; it only stores
and reads its outcome.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass
from typing import Any, Final

from kvern.analytics.queries import Reader
from kvern.analytics.records import SqlValue

PARITY_COLUMNS: Final[tuple[str, ...]] = (
    "ts_s",
    "model",
    "upstream",
    "method",
    "status",
    "template_match",
    "tokens_match",
    "first_diff_json",
    "detail",
)

INSERT_PARITY_SQL: Final[str] = (
    f"INSERT INTO parity_checks ({', '.join(PARITY_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in PARITY_COLUMNS)})"
)


@dataclass(slots=True)
class ParityRow:
    """One parity check's outcome, as stored (fields in column order)."""

    ts_s: float  # when the check finished (wall clock)
    model: str  # request model name
    upstream: str  # upstream name (host:port unless configured)
    method: str | None  # "llamacpp", "vllm", or None when nothing answered
    status: str  # match, mismatch, unsupported, error, skipped_fallback
    template_match: bool | None  # None: not compared
    tokens_match: bool | None  # None: not compared
    first_diff_json: str | None  # the first difference, as JSON
    detail: str | None  # why unsupported / error, or a note

    def to_row(self) -> tuple[SqlValue, ...]:
        """Values in :data:`PARITY_COLUMNS` order, booleans as 0/1."""
        out: list[SqlValue] = []
        for value in astuple(self):
            out.append(int(value) if isinstance(value, bool) else value)
        return tuple(out)


def _as_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


async def latest_parity(reader: Reader, *, model: str | None = None) -> list[dict[str, Any]]:
    """The latest check per (model, upstream), ordered by model then upstream.

    Not limited to a time window: a check runs once per process, so the
    latest one stays the current answer however long ago it was made.
    """
    where = "WHERE model = ?" if model is not None else ""
    params: tuple[object, ...] = (model,) if model is not None else ()
    # The largest rowid is the last row inserted for that pair.
    rows = await reader.fetchall(
        f"""
        SELECT {", ".join("p." + c for c in PARITY_COLUMNS)}
        FROM parity_checks AS p
        JOIN (
            SELECT MAX(rowid) AS last FROM parity_checks {where} GROUP BY model, upstream
        ) AS latest ON p.rowid = latest.last
        ORDER BY p.model, p.upstream
        """,
        params,
    )
    out: list[dict[str, Any]] = []
    for row in rows:
        item = dict(zip(PARITY_COLUMNS, row, strict=True))
        first_diff = item.pop("first_diff_json")
        item["first_diff"] = json.loads(first_diff) if first_diff else None
        item["template_match"] = _as_bool(item["template_match"])
        item["tokens_match"] = _as_bool(item["tokens_match"])
        out.append(item)
    return out
