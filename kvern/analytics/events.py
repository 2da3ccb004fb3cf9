"""Rows of the ``events`` table: moments that change how the rows after them read.

Why: a user who edits ``config.yaml``'s normalization rules while kvern runs
wants to see whether reuse rose. The rows do not say which rules keyed them,
so the moment the rules changed is stored beside them (written once per
change by :meth:`kvern.analytics.store.AnalyticsStore.write_one`), and
``/analytics`` lists the changes in its window: the dashboard draws each one
on its time charts, and the figures before and after sit side by side.
"""

from __future__ import annotations

import json
from typing import Any, Final

from kvern.analytics.queries import WINDOWS, Reader
from kvern.analytics.records import SqlValue

INSERT_EVENT_SQL: Final[str] = "INSERT INTO events (ts_s, kind, detail) VALUES (?, ?, ?)"
RULES_CHANGED: Final[str] = "rules_changed"


def rules_changed(ts_s: float, models: list[str], rules_hash: str) -> tuple[SqlValue, ...]:
    """The row of one applied change of rules: which model keys changed, and the new rules' hash."""
    return (ts_s, RULES_CHANGED, json.dumps({"models": models, "rules_hash": rules_hash}))


async def rules_changes(reader: Reader, *, window: str, now_s: float) -> list[dict[str, Any]]:
    """``[{ts_s, models, rules_hash}]`` of the changes within the window, oldest first."""
    span_s = WINDOWS[window]
    since_s = float("-inf") if span_s is None else now_s - span_s
    rows = await reader.fetchall(
        "SELECT ts_s, detail FROM events WHERE kind = ? AND ts_s >= ? ORDER BY ts_s, rowid",
        (RULES_CHANGED, since_s),
    )
    out: list[dict[str, Any]] = []
    for ts_s, detail in rows:
        facts = json.loads(detail) if detail else {}
        out.append(
            {"ts_s": ts_s, "models": facts.get("models", []), "rules_hash": facts.get("rules_hash")}
        )
    return out
