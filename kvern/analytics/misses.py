"""The queries behind ``/analytics``' ``miss_reasons`` and ``misses``: why tokens were not reused.

``miss_reasons``: over the rows that carry a breakdown (requests kvern
tokenized), the prompt tokens reused and, per reason, the requests and the
tokens it cost; they add up -- ``reused + novel + sum(tokens) == prompt`` --
and ``adds_up`` says so for the window shown.

``misses``: the divergence sites that cost the most tokens, grouped by model,
tenant, the shared prefix before the divergence (a hash of its token ids)
and the place it falls; each with its requests, tokens lost, where in the
prompt, and a few text windows (newest first) for the advice and the page.
Sites in a request's last message rank after the others (see
:meth:`kvern.diagnosis.layout.Place.describe`).
"""

from __future__ import annotations

from typing import Any

from kvern.analytics.queries import Reader, _filter
from kvern.diagnosis.layout import LAST_MESSAGE
from kvern.diagnosis.reasons import REASONS

# Examples read per site (the advice generalises over them; the page shows two).
_EXAMPLES = 8


async def miss_reasons(
    reader: Reader, *, window: str, model: str | None, now_s: float
) -> dict[str, Any]:
    """Reused tokens, novel tokens and per reason requests and tokens, over the window."""
    where, params = _filter(window, model, now_s)
    where += " AND miss_tokens IS NOT NULL"
    totals = await reader.fetchall(
        "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(miss_tokens), 0),"
        " COALESCE(SUM(lost_tokens), 0), COALESCE(SUM(novel_tokens), 0)"
        f" FROM requests WHERE {where}",
        params,
    )
    requests, prompt, missed, lost, novel = (int(v) for v in totals[0])
    reasons: dict[str, dict[str, int]] = {r: {"requests": 0, "tokens": 0} for r in REASONS}
    for column, tokens in (("miss_reason", "miss_tokens"), ("lost_reason", "lost_tokens")):
        rows = await reader.fetchall(
            f"SELECT {column}, COUNT(*), SUM({tokens}) FROM requests"
            f" WHERE {where} AND {column} IS NOT NULL GROUP BY {column}",
            params,
        )
        for reason, count, total in rows:
            entry = reasons.setdefault(str(reason), {"requests": 0, "tokens": 0})
            entry["requests"] += int(count)
            entry["tokens"] += int(total or 0)
    reused = prompt - missed - lost - novel
    counted = reused + novel + sum(e["tokens"] for e in reasons.values())
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "reused_tokens": reused,
        "novel_tokens": novel,
        "reasons": reasons,
        "adds_up": counted == prompt and reused >= 0,
    }


async def sites(
    reader: Reader, *, window: str, model: str | None, now_s: float, top: int
) -> list[dict[str, Any]]:
    """The ``top`` divergence sites by tokens lost, with their newest text windows."""
    where, params = _filter(window, model, now_s)
    where += " AND miss_reason = 'diverged' AND diverge_prefix IS NOT NULL"
    groups = await reader.fetchall(
        "SELECT model, tenant, diverge_prefix, diverge_place, COUNT(*), SUM(miss_tokens),"
        " MIN(diverge_at), MAX(diverge_at), MAX(ts_s)"
        f" FROM requests WHERE {where}"
        " GROUP BY model, tenant, diverge_prefix, diverge_place"
        # A new turn's own last message parting from an earlier one is how chats
        # go: those sites come after the ones worth a fix.
        " ORDER BY (diverge_place LIKE :site_last) ASC, SUM(miss_tokens) DESC, COUNT(*) DESC"
        " LIMIT :site_top",
        {**params, "site_top": top, "site_last": "%" + LAST_MESSAGE},
    )
    out: list[dict[str, Any]] = []
    for name, tenant, prefix, place, count, lost, first_at, last_at, last_s in groups:
        examples = await reader.fetchall(
            "SELECT request_id, ts_s, diverge_before, diverge_ours, diverge_theirs"
            f" FROM requests WHERE {where} AND model = :s_model AND diverge_prefix = :s_prefix"
            " AND diverge_place = :s_place AND COALESCE(tenant, '') = COALESCE(:s_tenant, '')"
            " ORDER BY ts_s DESC LIMIT :s_n",
            {
                **params,
                "s_model": name,
                "s_prefix": prefix,
                "s_place": place,
                "s_tenant": tenant,
                "s_n": _EXAMPLES,
            },
        )
        out.append(
            {
                "model": name,
                "tenant": tenant,
                "prefix_id": prefix,
                "site": f"{prefix}:{place}",
                "place": place,
                "requests": int(count),
                "tokens_lost": int(lost or 0),
                "at_token": int(first_at) if first_at == last_at else [int(first_at), int(last_at)],
                "last_seen_s": last_s,
                "examples": [
                    {
                        "request_id": rid,
                        "ts_s": ts,
                        "before": b or "",
                        "ours": o or "",
                        "theirs": t or "",
                    }
                    for rid, ts, b, o, t in examples
                ],
            }
        )
    return out
