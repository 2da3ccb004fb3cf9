"""Time to first byte of cache hits against misses, overall and over time.

Why: the point of a prefix hit is prefill the backend skips, and the first
byte is where a user feels it. ``summary`` has the overall percentiles per
split; this adds how many requests each figure rests on and the same split
per time bucket, so a chart can show whether hits stay faster as traffic
changes. Percentiles are the nearest-rank ones of :mod:`kvern.analytics.queries`,
over requests that did not fail and whose hit was counted.
"""

from __future__ import annotations

from typing import Any

from kvern.analytics.queries import (
    _NOT_FAILED,
    Reader,
    _empty_percentiles,
    _filter,
    _grouped_percentiles,
)

# Percentiles of each split, overall and per bucket.
_PERCENTILES = (50, 90, 99)
_SPLITS = ("hit", "miss")


async def ttfb_by_hit(
    reader: Reader,
    *,
    window: str = "24h",
    model: str | None = None,
    bucket_s: int | None = None,
    now_s: float,
) -> dict[str, Any]:
    """``overall`` (and with ``bucket_s`` a ``timeseries``): per split, requests and percentiles.

    A split's percentiles are None when it has no request; buckets without
    any request with a time to first byte are left out, oldest first.
    """
    if bucket_s is not None and (
        isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s < 1
    ):
        raise ValueError(f"bucket_s must be a positive integer, got {bucket_s!r}")
    where, params = _filter(window, model, now_s)
    out: dict[str, Any] = {"overall": (await _split(reader, "NULL", where, params)).get(None)}
    if out["overall"] is None:
        out["overall"] = {split: _no_figures() for split in _SPLITS}
    if bucket_s is not None:
        params["bucket_s"] = bucket_s
        bucket = "((CAST(ts_s AS INTEGER) / :bucket_s) * :bucket_s)"
        per = await _split(reader, bucket, where, params)
        out["timeseries"] = [
            {"bucket_start_s": int(start_s), **per[start_s]} for start_s in sorted(per)
        ]
    return out


async def _split(
    reader: Reader, group_expr: str, where: str, params: dict[str, object]
) -> dict[Any, dict[str, dict[str, Any]]]:
    """Group -> "hit"/"miss" -> requests and ttfb percentiles."""
    counts = await reader.fetchall(
        f"SELECT {group_expr} AS g,"
        " COALESCE(SUM(CASE WHEN hit = 1 THEN 1 ELSE 0 END), 0),"
        " COALESCE(SUM(CASE WHEN hit = 0 THEN 1 ELSE 0 END), 0)"
        f" FROM requests WHERE ({where}) AND ttfb_ms IS NOT NULL AND {_NOT_FAILED}"
        " AND hit IS NOT NULL GROUP BY g",
        params,
    )
    pcts = await _grouped_percentiles(reader, group_expr, where, params, _PERCENTILES)
    out: dict[Any, dict[str, dict[str, Any]]] = {}
    for group, hits, misses in counts:
        figures = pcts.get(group, _empty_percentiles(_PERCENTILES))["ttfb_ms"]
        out[group] = {
            "hit": {"requests": int(hits), **figures["hit"]},
            "miss": {"requests": int(misses), **figures["miss"]},
        }
    return out


def _no_figures() -> dict[str, Any]:
    return {"requests": 0, **{f"p{p}": None for p in _PERCENTILES}}
