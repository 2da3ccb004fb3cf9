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

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    rule: NormalizationRule  # the rule replayed (the suggestion, or its prompt-scope twin)
    sites: list[int]
    suggested: NormalizationRule | None = None  # what was advised, when ``rule`` differs
    note: str = ""  # why it differs


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


# A suggested rule's fixed-width lookbehind: ``(?<=literal text)``, escapes included.
_LOOKBEHIND = re.compile(r"^\(\?<=(?P<anchor>(?:[^()\\]|\\.)*)\)")


def twins(c: Candidate) -> list[Candidate]:
    """Versions of a ``messages`` rule that matched nothing, to replay instead, best first.

    Its lookbehind was taken from the rendered prompt and may reach past the
    start of the message into the template's text (``\\n`` before a system
    prompt, even the injected date): first the same rule anchored on the
    text after its last newline only (the message's own), then the rule as
    it is, applied to the rendered prompt (where it was measured).
    """
    out: list[Candidate] = []
    found = _LOOKBEHIND.match(c.rule.pattern)
    if found is not None and "\\n" in found["anchor"]:
        tail = found["anchor"].rsplit("\\n", 1)[1]
        if tail:
            pattern = f"(?<={tail})" + c.rule.pattern[found.end() :]
            out.append(
                replace(
                    c,
                    rule=c.rule.model_copy(update={"pattern": pattern}),
                    suggested=c.rule,
                    note="as suggested it matched no message text (its anchor began in the "
                    "template's text); anchored on the message's own text instead",
                )
            )
    out.append(
        replace(
            c,
            rule=c.rule.model_copy(update={"scope": "prompt"}),
            suggested=c.rule,
            note="as suggested (scope messages) it matched no message text; replayed on the "
            "rendered prompt (scope prompt) instead",
        )
    )
    return out


def changed(before: PassResult, after: PassResult) -> bool:
    """Whether a rule made any difference to what the log's prompts share."""
    if before.totals.summary() != after.totals.summary():
        return True
    return any(
        after.groups.get(k, Tally()).summary() != t.summary() for k, t in before.groups.items()
    )


def run_what_ifs(
    log: LogFile,
    setup: Setup,
    base: PassResult,
    chosen: Sequence[Candidate],
    *,
    on_pass: Callable[[str], OnProgress | None] | None = None,
) -> tuple[list[Candidate], list[PassResult], PassResult | None]:
    """One pass per candidate, then one with all of them (when there are two or more).

    A ``messages`` rule that changes nothing in the log -- its pattern was
    measured on the rendered prompt, and may lean on text just outside the
    message -- is replayed again as each of its :func:`twins` until one
    changes something: the candidates come back with the rule each pass used. ``on_pass(label)``
    is told each pass's name first and may hand back its progress callback.
    """

    def replay(label: str, these: Sequence[Candidate]) -> PassResult:
        progress = on_pass(label) if on_pass is not None else None
        rules = rules_with(setup.rules, these)
        return run_pass(log, setup, rules, full=False, on_progress=progress)

    n = len(chosen)
    used: list[Candidate] = []
    per_rule: list[PassResult] = []
    for i, c in enumerate(chosen, 1):
        result = replay(f"rule {i}/{n}", [c])
        if c.rule.scope == "messages" and not changed(base, result):
            for twin in twins(c):
                again = replay(f"rule {i}/{n} (again)", [twin])
                if changed(base, again):
                    c, result = twin, again
                    break
        used.append(c)
        per_rule.append(result)
    together = replay("all rules", used) if len(used) > 1 else None
    return used, per_rule, together


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
