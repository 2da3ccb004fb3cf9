"""Routing figures per upstream, from the ``requests`` table: /analytics' ``routing``.

Why apart from :mod:`kvern.analytics.queries`: these figures only exist with
several upstreams (``route_reason`` is set by the router), and they answer
routing questions: did each replica get its share, did the prefixes it was
sent for come back as cache hits (predicted vs reported, per replica), how
loaded was it when chosen, how often did requests fail over to it.
"""

from __future__ import annotations

from typing import Any

from kvern.analytics.queries import Reader, _filter, _ratio

_FAILED = "(error IS NOT NULL OR status IS NULL OR status >= 400)"
_REPORTED = "(reported_cached_tokens IS NOT NULL AND predicted_cached_tokens IS NOT NULL)"
# Answered requests with the router's expected time to first byte beside the real one.
_TIMED = f"(route_expected_ttft_ms IS NOT NULL AND ttfb_ms IS NOT NULL AND NOT {_FAILED})"

_PER_UPSTREAM = f"""
SELECT upstream,
    COUNT(*),
    COALESCE(SUM(CASE WHEN {_FAILED} THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN route_attempts > 1 THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN {_REPORTED} THEN 1 ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN {_REPORTED} THEN predicted_cached_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_REPORTED} THEN reported_cached_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_REPORTED} THEN upstream_prompt_tokens END), 0),
    AVG(route_load_tokens),
    MAX(route_load_tokens),
    COALESCE(SUM(CASE WHEN {_TIMED} THEN 1 ELSE 0 END), 0),
    AVG(CASE WHEN {_TIMED} THEN route_expected_ttft_ms END),
    AVG(CASE WHEN {_TIMED} THEN ttfb_ms END),
    AVG(CASE WHEN {_TIMED} THEN ABS(ttfb_ms - route_expected_ttft_ms) END)
FROM requests WHERE {{where}} AND route_reason IS NOT NULL
GROUP BY upstream ORDER BY upstream
"""


async def routing(
    reader: Reader, *, window: str, model: str | None, now_s: float
) -> dict[str, Any] | None:
    """Per-upstream routing figures and the count of each routing reason; None: no routing."""
    where, params = _filter(window, model, now_s)
    rows = await reader.fetchall(_PER_UPSTREAM.format(where=where), params)
    if not rows:
        return None
    reasons = await reader.fetchall(
        "SELECT route_reason, COUNT(*) FROM requests"
        f" WHERE {where} AND route_reason IS NOT NULL GROUP BY route_reason ORDER BY 2 DESC",
        params,
    )
    by_upstream = []
    for row in rows:
        name, requests, failed, failed_over, num_rep, predicted, reported, prompt = row[:8]
        avg, peak, timed, expected_ms, actual_ms, error_ms = row[8:]
        by_upstream.append(
            {
                "upstream": name,
                "requests": int(requests),
                "failed": int(failed),
                "arrived_by_failover": int(failed_over),
                "requests_with_report": int(num_rep),
                "predicted_cached_tokens": int(predicted),
                "reported_cached_tokens": int(reported),
                "reported_prompt_tokens": int(prompt),
                "reported_hit_rate": _ratio(int(reported), int(prompt)),
                "reported_to_predicted_ratio": _ratio(int(reported), int(predicted)),
                "load_tokens_when_chosen": {
                    "mean": round(float(avg), 1) if avg is not None else None,
                    "max": int(peak) if peak is not None else None,
                },
                # The router's latency model against the real first bytes.
                "ttft_model": {
                    "requests": int(timed),
                    "expected_ms_mean": _ms(expected_ms),
                    "actual_ms_mean": _ms(actual_ms),
                    "abs_error_ms_mean": _ms(error_ms),
                },
            }
        )
    return {"reasons": {str(r): int(n) for r, n in reasons}, "by_upstream": by_upstream}


def _ms(value: float | None) -> float | None:
    return round(float(value), 1) if value is not None else None
