"""Suggested normalization rules: the varying span of a divergence site, generalised to a regex.

Why generalise and not quote: a site is many requests that share a prefix and
then differ at the same place. Their varying spans, side by side, are of one
kind -- a UUID, a date, a time, a request id, a number -- and a pattern of
that kind, anchored on the literal text just before it (a fixed-width
lookbehind, so only that occurrence is rewritten), turns every variant into
one placeholder. :func:`suggest` only proposes; :mod:`kvern.diagnosis.replay`
measures what the rule would have saved and what else it would touch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_WEEKDAY = r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,?\s)?"

# (name, regex, placeholder), most specific first: the first kind that covers
# every example's varying span is the one suggested.
KINDS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "uuid",
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "<uuid>",
    ),
    (
        "iso_datetime",
        r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?",
        "<datetime>",
    ),
    ("iso_date", r"\d{4}-\d{2}-\d{2}", "<date>"),
    (
        "date",
        _WEEKDAY
        + r"(?:\d{1,2}\s"
        + _MONTH
        + r",?\s\d{4}|"
        + _MONTH
        + r"\s\d{1,2}(?:st|nd|rd|th)?,?\s\d{4})",
        "<date>",
    ),
    ("time", r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s?[AaPp]\.?[Mm]\.?)?", "<time>"),
    ("hex", r"\b[0-9a-fA-F]{8,}\b", "<hex>"),
    ("number", r"\d+(?:\.\d+)?", "<n>"),
    # An id: letters and digits with separators, or a mixed run of six or more.
    (
        "id",
        r"\b(?=[\w-]*\d)[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)+\b"
        r"|\b(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{6,}\b",
        "<id>",
    ),
)
# Literal characters of left context the rule is anchored on, at most.
_ANCHOR_CHARS = 24
# Characters both sides must share again after the varying span.
_RESYNC_CHARS = 4


@dataclass(frozen=True, slots=True)
class Example:
    """One divergence: the shared text before it, then each side's text after it."""

    before: str  # the shared text just before the divergence (its end)
    ours: str  # this request's text from the divergence on
    theirs: str  # the earlier prompt's text from the divergence on


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A rule in the form config.yaml takes, and how it was found."""

    pattern: str
    replacement: str
    scope: str  # "messages" or "prompt"
    kind: str  # which of KINDS the varying spans are
    spans: tuple[str, ...]  # the varying spans it was generalised from (a few)

    def as_config(self) -> dict[str, str]:
        return {"pattern": self.pattern, "replacement": self.replacement, "scope": self.scope}


def varying_spans(example: Example) -> tuple[str, str, str] | None:
    """(anchor text, our span, their span): where the two sides differ, and the text before.

    The sides are re-synchronised on their first common run of a few
    characters after the divergence; when they are not within the texts given,
    each span runs to its text's end. None when the sides do not differ.
    """
    ours, theirs = example.ours, example.theirs
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    o, t = ours[common:], theirs[common:]
    if not o and not t:
        return None
    anchor = example.before + ours[:common]
    matcher = difflib.SequenceMatcher(None, o, t, autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= _RESYNC_CHARS:
            return anchor, o[: block.a], t[: block.b]
    return anchor, o, t


def _covering(kind_re: re.Pattern[str], text: str, start: int, end: int) -> tuple[int, int] | None:
    """The match of ``kind_re`` in ``text`` that covers [start, end), if any."""
    for m in kind_re.finditer(text):
        if m.start() <= start and end <= m.end() and m.end() > m.start():
            return m.start(), m.end()
        if m.start() > start:
            break
    return None


def suggest(examples: Sequence[Example], *, scope: str) -> Suggestion | None:
    """The most specific kind of span that covers every example's varying part, as a rule.

    Both sides of each example must be covered by one match of the kind,
    starting in the shared text at most (a date whose day differs starts
    before the first differing digit); the rule is anchored on the literal
    text all examples share just before those matches.
    """
    found = [(ex, v) for ex in examples if (v := varying_spans(ex)) is not None]
    if not found:
        return None
    for name, regex, placeholder in KINDS:
        kind_re = re.compile(regex)
        lefts: list[int] = []
        spans: list[str] = []
        for ex, (anchor, our_span, their_span) in found:
            start = len(anchor)
            for side, span in ((ex.ours, our_span), (ex.theirs, their_span)):
                full = ex.before + side
                cover = _covering(kind_re, full, start, start + max(1, len(span)))
                if cover is None:
                    break
                lefts.append(cover[0])
                spans.append(full[cover[0] : cover[1]])
            else:
                continue
            break  # a side this kind does not cover
        else:
            anchor_text = _anchor([a for _, (a, _, _) in found], min(lefts))
            pattern = (f"(?<={literal(anchor_text)})(?:{regex})" if anchor_text else regex)
            return Suggestion(pattern, placeholder, scope, name, tuple(dict.fromkeys(spans))[:6])
    return None


def _anchor(anchors: Sequence[str], left: int) -> str:
    """The literal text every example has just before position ``left`` (a few words at most)."""
    texts = [a[:left] for a in anchors]
    common = texts[0]
    for other in texts[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[-1 - n] == other[-1 - n]:
            n += 1
        common = common[len(common) - n :]
    anchor = common[-_ANCHOR_CHARS:]
    if len(common) > _ANCHOR_CHARS:
        # Start at a word boundary so the anchor reads as text, not half a word.
        cut = re.search(r"[\s:=(\[{\"',]", anchor)
        if cut is not None:
            anchor = anchor[cut.start() + (1 if anchor[cut.start()].isspace() else 0) :]
    return anchor


def literal(text: str) -> str:
    """``text`` as a regex matching it literally, escaping only what regex syntax needs.

    (``re.escape`` also escapes spaces and punctuation, which is correct but
    hard to read in config.yaml; a newline is written ``\\n``.)
    """
    escaped = re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text)
    return escaped.replace("\n", "\\n").replace("\t", "\\t")


def marked(example: Example) -> tuple[str, str]:
    """Both sides' text with the differing span in brackets, for people to read side by side."""
    found = varying_spans(example)
    if found is None:
        return example.ours, example.theirs
    anchor, our_span, their_span = found
    common = len(anchor) - len(example.before)
    ours, theirs = example.ours, example.theirs
    head = ours[:common]
    return (
        f"{head}[{our_span}]{ours[common + len(our_span) :]}",
        f"{head}[{their_span}]{theirs[common + len(their_span) :]}",
    )
