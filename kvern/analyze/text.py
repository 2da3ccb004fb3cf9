"""The report for people: plain aligned tables, drawn from the JSON object (one source of truth).

Why from the JSON and not from the analysis: what ``--json`` says and what
the tables say can then never disagree. Text of prompts is shown with its
newlines and tabs written ``\\n`` and ``\\t`` so every example stays on one
line, and cut to a width a terminal holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from kvern.diagnosis.reasons import REASONS

# Characters of shared text shown before a divergence, and of each side after it.
_BEFORE_CHARS: Final[int] = 24
_SIDE_CHARS: Final[int] = 48
# Groups listed (most prompt tokens first) before the rest are summed up.
_MAX_GROUPS: Final[int] = 20
_CURVE_HEAD: Final[str] = "capacity tokens"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()
) -> list[str]:
    """Aligned columns: numbers (and the columns in ``right``) to the right, text to the left."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    flush_right = [
        i in right or bool(rows) and all(_is_number(row[i]) for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if flush_right[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(list(headers)), *(line(row) for row in cells)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or value is None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1%}"
    return str(value)


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _side(before: str, marked: str) -> str:
    head = one_line(before[-_BEFORE_CHARS:])
    body = one_line(marked)
    if len(body) > _SIDE_CHARS:
        body = body[:_SIDE_CHARS] + "…"
    return f"…{head}{body}"


def _header(r: dict[str, Any]) -> list[str]:
    groups = r["groups"]
    tenants = {g["tenant"] for g in groups}
    lines = [
        f"kvern analyze {r['log']}: {r['requests']:,} requests, {len(r['models'])} model(s), "
        f"{len(tenants)} tenant(s), {r['elapsed_s']:.1f} s"
    ]
    bad = r["bad_lines"]
    if bad["count"]:
        shown = ", ".join(f"{b['line']} ({b['error']})" for b in bad["lines"][:5])
        more = f", and {bad['count'] - 5:,} more" if bad["count"] > 5 else ""
        lines.append(f"  {bad['count']:,} bad line(s), skipped: {shown}{more}")
    for m in r["models"]:
        tok = m["tokenizer"]
        source = tok["source"] or "none"
        line = f"  {m['model']}: tokenizer {tok['kind']} ({source}), block {m['block_size']}"
        if tok["error"]:
            line += f"; {tok['error']}"
        if m["template_errors"]:
            line += f"; {m['template_errors']:,} prompt(s) rendered without the model's template"
        lines.append(line)
    s = r["settings"]
    if s["capacity_tokens"] is not None:
        lines.append(
            f"  backend cache modelled as an LRU of {s['capacity_tokens']:,} tokens per model"
        )
    rules = sum(len(v) for v in s["rules"].values())
    lines.append(f"  normalization rules in force: {rules}")
    return lines


def _reuse(r: dict[str, Any]) -> list[str]:
    headers = [
        "model",
        "tenant",
        "requests",
        "prompt tokens",
        "reusable (any)",
        "reusable (blocks)",
        "reused",
        "reuse",
    ]
    rows = []
    for g in [dict(r["totals"], model="(all)", tenant="(all)"), *r["groups"][:_MAX_GROUPS]]:
        rows.append(
            [
                g["model"],
                g["tenant"],
                g["requests"],
                g["prompt_tokens"],
                g["reusable_any_tokens"],
                g["reusable_tokens"],
                g["reused_tokens"],
                _share(g["reused_tokens"], g["prompt_tokens"]),
            ]
        )
    out = ["", "Prompt tokens reusable: shared with an earlier prompt (any length; whole blocks)"]
    out += table(headers, rows)
    if len(r["groups"]) > _MAX_GROUPS:
        out.append(f"(and {len(r['groups']) - _MAX_GROUPS:,} more groups: --json lists them all)")
    return out


def _reasons(r: dict[str, Any]) -> list[str]:
    seen = [x for x in REASONS if r["totals"]["reasons"][x]["tokens"]]
    if not seen:
        return []
    rows = []
    for g in [dict(r["totals"], model="(all)", tenant="(all)"), *r["groups"][:_MAX_GROUPS]]:
        rows.append([g["model"], g["tenant"], *(g["reasons"][x]["tokens"] for x in seen)])
    out = ["", "Why the other tokens were not reused (tokens; novel: past every earlier prompt)"]
    return out + table(["model", "tenant", *seen], rows)


def _site(s: dict[str, Any]) -> list[str]:
    out = [
        f"#{s['rank']} {s['model']} · tenant {s['tenant']} · {s['place']} · "
        f"{s['requests']:,} request(s) · {s['tokens_lost']:,} tokens lost "
        f"(lines {s['first_line']}-{s['last_line']})"
    ]
    for ex in s["examples"]:
        out.append(f"    ours:   {_side(ex['before'], ex['ours_marked'])}")
        out.append(f"    theirs: {_side(ex['before'], ex['theirs_marked'])}")
    advice = s["advice"]
    measured = advice["measured"]
    if advice["rule"]:
        how = "not measured"
        if measured:
            share = measured["recovered_share"]
            how = (
                f"saves {measured['saved_tokens']:,} tokens over {measured['requests']} of its "
                f"prompts" + (f", {share:.0%} of what they lost to divergence" if share else "")
            )
        out.append(f"    suggested rule ({advice['kind']}): {how}")
        out += ["      " + line for line in advice["yaml"].rstrip().splitlines()]
    else:
        out.append(f"    no rule: {advice['note']}")
    return out


def _sites(r: dict[str, Any]) -> list[str]:
    sites = r["sites"]
    if not sites["top"]:
        return ["", "No divergence sites: no prompt parted from an earlier one."]
    out = ["", f"Divergence sites: {sites['count']:,}, the top {len(sites['top'])} by tokens lost"]
    if sites["untracked_requests"]:
        out.append(
            f"(past the first {sites['count']:,} sites, {sites['untracked_requests']:,} more "
            f"diverged requests lost {sites['untracked_tokens']:,} tokens)"
        )
    for s in sites["top"]:
        out += _site(s)
    return out


def _what_if(r: dict[str, Any]) -> list[str]:
    w = r["what_if"]
    if not w["ran"]:
        tried = any(s["advice"]["rule"] for s in r["sites"]["top"])
        return ["", "What if: not replayed (--no-what-if)"] if tried else []
    rows = []
    entries = [
        (f"{i} {x['rule']['replacement']} ({x['model']})", ",".join(f"#{n}" for n in x["sites"]), x)
        for i, x in enumerate(w["rules"], 1)
    ]
    if w["all"] is not None:
        entries.append(("all rules", "", w["all"]))
    for name, sites, x in entries:
        rows.append(
            [
                name,
                sites,
                x["before"]["reused_tokens"],
                x["after"]["reused_tokens"],
                x["saved_tokens"],
                x["before"]["diverged_tokens"],
                x["after"]["diverged_tokens"],
                x["recovered_share"],
            ]
        )
    out = [
        "",
        "What if: the whole log replayed with each suggested rule (recovered: of the "
        "tokens lost to divergence)",
    ]
    headers = [
        "rule",
        "sites",
        "reused before",
        "after",
        "saved",
        "diverged before",
        "after",
        "recovered",
    ]
    out += table(headers, rows)
    for i, x in enumerate(w["rules"], 1):
        if not x["saved_tokens"] and not x["by_group"]:
            out.append(f"rule {i}: it changed nothing in this log: check its pattern and scope")
    return out


def _capacity(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for c in r["capacity"]["models"]:
        if not c["points"]:
            continue
        out += [
            "",
            f"Capacity ({c['model']}, block {c['block_size']}): the token reuse an LRU "
            "prefix cache of each size would reach",
        ]
        rows = [
            [
                p["capacity_tokens"],
                f"{p['gib']:.3f}" if p["gib"] is not None else "-",
                p["reused_tokens"],
                p["reuse_share"],
                "" if p["exact"] else "(at least)",
            ]
            for p in c["points"]
        ]
        out += table([_CURVE_HEAD, "GiB", "reused tokens", "reuse", ""], rows, right=(1,))
        out.append(
            f"of {c['total_tokens']:,} prompt tokens ({c['distinct_blocks']:,} distinct blocks)"
        )
    return out


def render(r: dict[str, Any]) -> str:
    """The whole report as text."""
    lines = _header(r) + _reuse(r) + _reasons(r) + _sites(r) + _what_if(r) + _capacity(r)
    return "\n".join(lines) + "\n"
