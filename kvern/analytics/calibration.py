"""Calibration: kvern's predicted cached tokens against what each backend reported.

Why: kvern's product is one number per request -- how many prompt tokens the
backend could serve from its KV cache. Where the backend reports its own
figure, the two can be compared, and the comparison is kvern's accuracy, shown
to the user next to the numbers it qualifies: per upstream and model, the sums,
the mean absolute error, the share of requests off by more than one KV block,
the share exactly right, and the worst recent examples to look into.

Only rows with both figures count (a prediction exists only for requests the
backend answered; a report only where the backend gives one).
"""

from __future__ import annotations

from typing import Any

from kvern.analytics.queries import Reader, _filter

_BOTH = "predicted_cached_tokens IS NOT NULL AND reported_cached_tokens IS NOT NULL"
_ERR = "ABS(predicted_cached_tokens - reported_cached_tokens)"


async def calibration(
    reader: Reader,
    *,
    window: str = "24h",
    model: str | None = None,
    now_s: float,
    worst: int = 5,
) -> list[dict[str, Any]]:
    """One entry per (upstream, model): accuracy of kvern's predictions over the window."""
    where, params = _filter(window, model, now_s)
    groups = await reader.fetchall(
        "SELECT upstream, model, backend_model, COUNT(*),"
        " SUM(predicted_cached_tokens), SUM(reported_cached_tokens),"
        f" SUM({_ERR}),"
        f" SUM(CASE WHEN {_ERR} = 0 THEN 1 ELSE 0 END),"
        f" SUM(CASE WHEN {_ERR} > COALESCE(block_size, 1) THEN 1 ELSE 0 END),"
        " SUM(predicted_cached_tokens - reported_cached_tokens)"
        f" FROM requests WHERE {where} AND {_BOTH}"
        " GROUP BY upstream, model, backend_model ORDER BY COUNT(*) DESC, upstream, model",
        params,
    )
    out: list[dict[str, Any]] = []
    for upstream, name, backend, n, pred, rep, abs_err, exact, off, signed in groups:
        examples = await reader.fetchall(
            "SELECT request_id, ts_s, prompt_tokens, predicted_cached_tokens,"
            " reported_cached_tokens, matched_tokens"
            f" FROM requests WHERE {where} AND {_BOTH}"
            " AND upstream = :cal_upstream AND model = :cal_model"
            f" AND {_ERR} > 0 ORDER BY {_ERR} DESC, ts_s DESC LIMIT :cal_worst",
            {**params, "cal_upstream": upstream, "cal_model": name, "cal_worst": worst},
        )
        out.append(
            {
                "upstream": upstream,
                "model": name,
                "backend_model": backend,
                "requests": int(n),
                "predicted_cached_tokens": int(pred),
                "reported_cached_tokens": int(rep),
                "mean_abs_error_tokens": abs_err / n,
                "mean_signed_error_tokens": signed / n,
                "relative_error": (abs_err / rep) if rep else None,
                "exact_share": exact / n,
                "off_by_more_than_a_block_share": off / n,
                "worst": [
                    {
                        "request_id": rid,
                        "ts_s": ts,
                        "prompt_tokens": prompt,
                        "predicted": p,
                        "reported": r,
                        "trie_matched": m,
                    }
                    for rid, ts, prompt, p, r, m in examples
                ],
            }
        )
    return out
