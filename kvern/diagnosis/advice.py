"""One divergence site's advice: the rule to paste into config.yaml, and what it measurably saves.

Why one function for both paths: ``/analytics`` (rows in SQLite, prompts
sampled in the brain) and ``kvern analyze`` (a log on disk) find the same
sites and must give the same advice. A rule is suggested from the site's
varying spans (:mod:`kvern.diagnosis.rules`), then replayed over the site's
prompts (:mod:`kvern.diagnosis.replay`); a rule that would also rewrite
differing text elsewhere is not suggested, and the answer shows what it
would have merged. Where no pattern covers the spans (tools listed in
another order, a whole paragraph rewritten), the advice says what varies
instead of inventing a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvern.diagnosis.replay import Replay, Sample, replay
from kvern.diagnosis.rules import Example, Suggestion, suggest


@dataclass(slots=True)
class Advice:
    """What to do about one site."""

    rule: Suggestion | None  # the rule to paste, when one is safe and saves tokens
    measured: Replay | None  # the replay of that rule (or of the unsafe candidate)
    rejected: Suggestion | None = None  # a candidate refused, and why in ``note``
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.as_config() if self.rule else None,
            "kind": self.rule.kind if self.rule else None,
            "varying": list(self.rule.spans) if self.rule else [],
            "measured": self.measured.to_dict() if self.measured else None,
            "rejected": self.rejected.as_config() if self.rejected else None,
            "note": self.note,
        }


def scope_for(place_kind: str) -> str:
    """Where a rule for a divergence in ``place_kind`` must apply.

    Text inside a message's content is rewritten before rendering
    (``messages``); text the template writes itself (an injected date) or the
    rendered tools exist only in the rendered prompt (``prompt``).
    """
    return "messages" if place_kind in ("system", "message") else "prompt"


def advise(
    examples: Sequence[Example],
    samples: Sequence[Sample],
    *,
    place_kind: str,
    tokenize: Callable[[str], Sequence[int]] | None,
    block_size: int,
) -> Advice:
    """The advice for one site; ``tokenize`` None (no tokenizer at hand) skips the replay."""
    candidate = suggest(examples, scope=scope_for(place_kind))
    if candidate is None:
        what = "the tool definitions" if place_kind == "tools" else "the text"
        return Advice(
            None,
            None,
            note=f"no pattern covers what varies in {what} here (e.g. a reordered list or "
            "rewritten text): make the client send it the same way each time",
        )
    if tokenize is None or len(samples) < 2:
        return Advice(candidate, None, note="not measured: too few prompts of this site in memory")
    measured = replay(samples, candidate.pattern, candidate.replacement, tokenize, block_size)
    if measured.merges_beyond_span:
        return Advice(
            None,
            measured,
            rejected=candidate,
            note="not suggested: it would also rewrite text that differs between these prompts "
            f"elsewhere, e.g. {'; '.join(measured.others[:2])}",
        )
    if measured.saved_tokens <= 0:
        return Advice(
            None, measured, rejected=candidate, note="not suggested: it saves no tokens here"
        )
    return Advice(candidate, measured)
