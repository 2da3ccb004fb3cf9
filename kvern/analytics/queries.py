"""The query layer behind ``GET /analytics``: summaries, breakdowns, time series.

Why all aggregation happens in SQL: a 7-day window can hold millions of rows,
and the endpoint shares the store's one connection with the writer. Each
function issues a few queries whose answers are small (one row per group, nine
percentile values per group), never the rows themselves.

Percentiles are nearest-rank: the p-th percentile of n values is the value of
rank ``ceil(p * n / 100)`` in ascending order, always a value that occurred.
They are computed with window functions (SQLite >= 3.25): one sort per
(group, metric, split) partition, and only the ranked rows leave SQLite. The
alternative, ``COUNT`` then ``ORDER BY .. LIMIT 1 OFFSET k`` per percentile,
re-sorts the window once per figure (18 sorts for a summary).

Definitions shared by every figure:

- error: ``status >= 400`` or a kvern error code.
- hit_rate: hits / (hits + misses); rows whose prompt was not counted
  (``hit`` NULL) are in neither.
- token_reuse_ratio: sum(matched_tokens) / sum(prompt_tokens); the aligned
  variant uses matched_tokens_aligned.
- predicted: the cached tokens kvern's model of the backend's cache predicts
  (:mod:`kvern.cache_models`), the one predicted figure everywhere. Compared
  with reported over rows where the backend reported a cached figure AND
  kvern made a prediction, so both sums cover the same requests; requests
  predicted but with no report (a backend that reports none) are counted as
  ``unreported``, never as 0. ``seen_prefix_tokens`` is the trie's figure on
  those rows: any earlier prefix kvern saw, whether or not the backend kept it.
- approximate: requests tokenized by the approximate tokenizer; every figure
  of a group with any is an estimate, and says so.
- latency percentiles: over requests that did not fail (a 4xx answered at once
  or a timeout says nothing about cache reuse), split all / hit / miss.

Every ratio is None, never NaN, when its denominator is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

# Window name -> span (s); None = no lower bound.
WINDOWS: Final[Mapping[str, int | None]] = MappingProxyType(
    {"1h": 3600, "24h": 86_400, "7d": 604_800, "all": None}
)
# Percentiles reported for latency figures.
PERCENTILES: Final[tuple[int, ...]] = (50, 90, 99)
# The latency columns that get percentiles.
LATENCY_METRICS: Final[tuple[str, ...]] = ("ttfb_ms", "latency_ms")
# The splits every latency percentile is reported for.
SPLITS: Final[tuple[str, ...]] = ("all", "hit", "miss")
# breakdown(by=...) choices -> column.
GROUP_COLUMNS: Final[Mapping[str, str]] = MappingProxyType(
    {"model": "model", "tenant": "tenant", "end_user": "end_user", "upstream": "upstream"}
)

GroupBy = Literal["model", "tenant", "end_user", "upstream"]
Params = dict[str, object]

_FAILED = "(status >= 400 OR error IS NOT NULL)"
_NOT_FAILED = "(COALESCE(status, 0) < 400 AND error IS NULL)"
_WITH_REPORT = "reported_cached_tokens IS NOT NULL AND predicted_cached_tokens IS NOT NULL"
_UNREPORTED = "reported_cached_tokens IS NULL AND predicted_cached_tokens IS NOT NULL"

# The aggregate figures, in the order _core() unpacks them.
_CORE_SELECT = f"""
    COUNT(*),
    COALESCE(SUM(CASE WHEN {_FAILED} THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN hit = 1 THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN hit = 0 THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(prompt_tokens), 0),
    COALESCE(SUM(matched_tokens), 0),
    COALESCE(SUM(matched_tokens_aligned), 0),
    COALESCE(SUM(completion_tokens), 0),
    COALESCE(SUM(CASE WHEN {_WITH_REPORT} THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN {_WITH_REPORT} THEN predicted_cached_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_WITH_REPORT} THEN matched_tokens_aligned END), 0),
    COALESCE(SUM(CASE WHEN {_WITH_REPORT} THEN reported_cached_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_WITH_REPORT} THEN upstream_prompt_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_UNREPORTED} THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN tokenizer_kind = 'fallback' THEN 1 ELSE 0 END), 0)
"""


class Reader(Protocol):
    """Anything that runs a read query, e.g. :class:`kvern.analytics.store.AnalyticsStore`."""

    async def fetchall(
        self, sql: str, params: Sequence[object] | Mapping[str, object] = ...
    ) -> list[tuple[Any, ...]]: ...


async def summary(
    reader: Reader, *, window: str = "24h", model: str | None = None, now_s: float
) -> dict[str, Any]:
    """Overall figures for the window (optionally one model)."""
    where, params = _filter(window, model, now_s)
    groups = await _grouped_core(reader, "NULL", where, params)
    pcts = await _grouped_percentiles(reader, "NULL", where, params, PERCENTILES)
    kinds = await reader.fetchall(
        "SELECT tokenizer_kind, COUNT(*) FROM requests"
        f" WHERE {where} AND tokenizer_kind IS NOT NULL"
        " GROUP BY tokenizer_kind ORDER BY tokenizer_kind",
        params,
    )
    return {
        "window": window,
        "since_s": params.get("since_s"),
        "now_s": now_s,
        "model": model,
        **groups.get(None, _core(None)),
        **pcts.get(None, _empty_percentiles(PERCENTILES)),
        "tokenizer_kinds": {str(kind): int(count) for kind, count in kinds},
    }


async def breakdown(
    reader: Reader,
    *,
    by: GroupBy,
    window: str = "24h",
    model: str | None = None,
    now_s: float,
) -> list[dict[str, Any]]:
    """The summary's core figures and latency percentiles per model, tenant or upstream.

    Sorted by requests, most first; ties by key (None last) so output is stable.
    """
    if by not in GROUP_COLUMNS:
        raise ValueError(f"unknown breakdown {by!r}; choose one of {', '.join(GROUP_COLUMNS)}")
    column = GROUP_COLUMNS[by]
    where, params = _filter(window, model, now_s)
    groups = await _grouped_core(reader, column, where, params)
    pcts = await _grouped_percentiles(reader, column, where, params, PERCENTILES)
    rows = [
        {by: key, **core, **pcts.get(key, _empty_percentiles(PERCENTILES))}
        for key, core in groups.items()
    ]
    rows.sort(key=lambda row: (-row["requests"], row[by] is None, row[by] or ""))
    return rows


async def timeseries(
    reader: Reader,
    *,
    window: str = "24h",
    bucket_s: int,
    model: str | None = None,
    now_s: float,
) -> list[dict[str, Any]]:
    """Core figures and p50 latencies per time bucket, oldest first.

    Buckets start at multiples of ``bucket_s`` since the epoch (hour buckets
    fall on the UTC hour), so the first one may be cut by the window. Only
    buckets holding requests are returned; a chart fills the gaps.
    """
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s < 1:
        raise ValueError(f"bucket_s must be a positive integer, got {bucket_s!r}")
    where, params = _filter(window, model, now_s)
    params["bucket_s"] = bucket_s
    bucket = "((CAST(ts_s AS INTEGER) / :bucket_s) * :bucket_s)"
    groups = await _grouped_core(reader, bucket, where, params)
    pcts = await _grouped_percentiles(reader, bucket, where, params, (50,))
    series: list[dict[str, Any]] = []
    for start_s in sorted(groups):
        point: dict[str, Any] = {"bucket_start_s": int(start_s), **groups[start_s]}
        figures = pcts.get(start_s, _empty_percentiles((50,)))
        for metric in LATENCY_METRICS:
            point[f"{metric}_p50"] = figures[metric]["all"]["p50"]
        series.append(point)
    return series


def _filter(window: str, model: str | None, now_s: float) -> tuple[str, Params]:
    """The WHERE clause and its named parameters for a window and model."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    clauses: list[str] = []
    params: Params = {}
    span_s = WINDOWS[window]
    if span_s is not None:
        clauses.append("ts_s >= :since_s")
        params["since_s"] = now_s - span_s
    if model is not None:
        clauses.append("model = :model")
        params["model"] = model
    return (" AND ".join(clauses) or "1"), params


async def _grouped_core(
    reader: Reader, group_expr: str, where: str, params: Params
) -> dict[Any, dict[str, Any]]:
    """Core figures per value of ``group_expr`` (a constant gives one group)."""
    rows = await reader.fetchall(
        f"SELECT {group_expr} AS g, {_CORE_SELECT} FROM requests WHERE {where} GROUP BY g",
        params,
    )
    return {row[0]: _core(row[1:]) for row in rows}


def _core(row: Sequence[Any] | None) -> dict[str, Any]:
    """Name the aggregate figures and derive the ratios; None gives an empty window's."""
    (
        requests,
        errors,
        hits,
        misses,
        prompt,
        matched,
        aligned,
        completion,
        num_reported,
        predicted,
        seen_prefix,
        reported,
        reported_prompt,
        unreported,
        approximate,
    ) = (int(v) for v in (row if row is not None else (0,) * 15))
    return {
        "requests": requests,
        "errors": errors,
        "hits": hits,
        "misses": misses,
        "hit_rate": _ratio(hits, hits + misses),
        "prompt_tokens": prompt,
        "matched_tokens": matched,
        "matched_tokens_aligned": aligned,
        "token_reuse_ratio": _ratio(matched, prompt),
        "aligned_reuse_ratio": _ratio(aligned, prompt),
        "completion_tokens": completion,
        "predicted_vs_reported": {
            "requests_with_report": num_reported,
            "unreported_requests": unreported,
            "predicted_cached_tokens": predicted,
            "reported_cached_tokens": reported,
            "upstream_prompt_tokens": reported_prompt,
            "reported_to_predicted_ratio": _ratio(reported, predicted),
            "seen_prefix_tokens": seen_prefix,
        },
        "approximate_requests": approximate,
        "approximate": approximate > 0,
    }


async def _grouped_percentiles(
    reader: Reader,
    group_expr: str,
    where: str,
    params: Params,
    percentiles: tuple[int, ...],
) -> dict[Any, dict[str, dict[str, dict[str, float | None]]]]:
    """Nearest-rank percentiles: group -> metric -> split -> "p50" -> value.

    ``(p * n + 99) / 100`` is ``ceil(p * n / 100)`` in integer arithmetic.
    """
    assert all(isinstance(p, int) and 0 < p <= 100 for p in percentiles), percentiles
    parts: list[str] = []
    for metric in LATENCY_METRICS:
        base = f"FROM requests WHERE ({where}) AND {metric} IS NOT NULL AND {_NOT_FAILED}"
        parts.append(
            f"SELECT {group_expr} AS g, '{metric}' AS metric, 'all' AS split, {metric} AS x {base}"
        )
        parts.append(
            f"SELECT {group_expr}, '{metric}', CASE WHEN hit = 1 THEN 'hit' ELSE 'miss' END,"
            f" {metric} {base} AND hit IS NOT NULL"
        )
    values = ", ".join(f"({p})" for p in percentiles)
    sql = f"""
        WITH v AS ({" UNION ALL ".join(parts)}),
        ranked AS (
            SELECT g, metric, split, x,
                ROW_NUMBER() OVER (PARTITION BY g, metric, split ORDER BY x) AS rn,
                COUNT(*) OVER (PARTITION BY g, metric, split) AS n
            FROM v
        ),
        ps(p) AS (VALUES {values})
        SELECT ranked.g, ranked.metric, ranked.split, ps.p, ranked.x
        FROM ranked JOIN ps ON ranked.rn = (ps.p * ranked.n + 99) / 100
    """
    out: dict[Any, dict[str, dict[str, dict[str, float | None]]]] = {}
    for group, metric, split, p, x in await reader.fetchall(sql, params):
        figures = out.setdefault(group, _empty_percentiles(percentiles))
        figures[metric][split][f"p{p}"] = float(x)
    return out


def _empty_percentiles(
    percentiles: tuple[int, ...],
) -> dict[str, dict[str, dict[str, float | None]]]:
    return {
        metric: {split: {f"p{p}": None for p in percentiles} for split in SPLITS}
        for metric in LATENCY_METRICS
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None
