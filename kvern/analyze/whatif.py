"""What if the suggested rules had been in config.yaml: the whole log replayed with each.

Why the whole log and not the site's samples: a rule's replay over its own
site's prompts (:mod:`kvern.diagnosis.replay`) says what it saves there; the
log says what it saves everywhere it matches -- other sites of the same
cause (two ids that share their first characters part at different tokens),
other tenants -- and whether it costs anything elsewhere. Each rule is
added to the rules in force for its model (its exact name) and the log goes
through the same pipeline again (:func:`kvern.analyze.passes.run_pass`,
tokenized with the normalizer); then once more with every rule together.

``recovered_share`` is read as the site replay reads it: of the tokens lost
to divergences before, the share the rule(s) brought back
(``1 - diverged_after / diverged_before``). Divergences no rule can undo (a
new conversation's first question parts from the last one's) stay in both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvern.analyze.log import LogFile
from kvern.analyze.passes import OnProgress, PassResult, run_pass
from kvern.analyze.setup import Rules, Setup, with_rule
from kvern.analyze.tally import Tally
from kvern.config import NormalizationRule


@dataclass(slots=True)
class Candidate:
    """One suggested rule for one model, and the sites (ranks) that suggested it."""

    model: str
    rule: NormalizationRule
    sites: list[int]


def candidates(suggested: Sequence[tuple[int, str, dict[str, str] | None]]) -> list[Candidate]:
    """Distinct (model, rule) pairs of ``(rank, model, rule as config or None)``, by rank."""
    out: list[Candidate] = []
    seen: dict[tuple[str, str, str, str], Candidate] = {}
    for rank, model, rule in suggested:
        if rule is None:
            continue
        key = (model, rule["pattern"], rule["replacement"], rule["scope"])
        if key in seen:
            seen[key].sites.append(rank)
            continue
        seen[key] = Candidate(model, NormalizationRule.model_validate(rule), [rank])
        out.append(seen[key])
    return out


def rules_with(base: Rules, chosen: Sequence[Candidate]) -> Rules:
    rules = base
    for c in chosen:
        rules = with_rule(rules, c.model, c.rule)
    return rules


def run_what_ifs(
    log: LogFile,
    setup: Setup,
    chosen: Sequence[Candidate],
    *,
    on_pass: Callable[[str], OnProgress | None] | None = None,
) -> tuple[list[PassResult], PassResult | None]:
    """One pass per candidate, then one with all of them (when there are two or more).

    ``on_pass(label)`` is told each pass's name first and may hand back its progress callback.
    """

    def replay(label: str, these: Sequence[Candidate]) -> PassResult:
        progress = on_pass(label) if on_pass is not None else None
        rules = rules_with(setup.rules, these)
        return run_pass(log, setup, rules, full=False, on_progress=progress)

    n = len(chosen)
    per_rule = [replay(f"rule {i}/{n}", [c]) for i, c in enumerate(chosen, 1)]
    together = replay("all rules", chosen) if len(chosen) > 1 else None
    return per_rule, together


def _share(before: Tally, after: Tally) -> float | None:
    if before.diverged_tokens <= 0:
        return None
    return 1.0 - after.diverged_tokens / before.diverged_tokens


def compare(before: PassResult, after: PassResult) -> dict[str, Any]:
    """Before and after, for the log and for each (model, tenant) whose figures moved."""
    groups: list[dict[str, Any]] = []
    for key, b in before.groups.items():
        a = after.groups.get(key, Tally())
        if a.summary() == b.summary():
            continue
        groups.append(
            {
                "model": key[0],
                "tenant": key[1],
                "before": b.summary(),
                "after": a.summary(),
                "saved_tokens": a.reused_tokens - b.reused_tokens,
                "recovered_share": _share(b, a),
            }
        )
    groups.sort(key=lambda g: (-g["saved_tokens"], g["model"], g["tenant"]))
    return {
        "before": before.totals.summary(),
        "after": after.totals.summary(),
        "saved_tokens": after.totals.reused_tokens - before.totals.reused_tokens,
        "recovered_share": _share(before.totals, after.totals),
        "by_group": groups,
    }
