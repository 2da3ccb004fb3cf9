"""Where a token of a rendered prompt comes from: system prompt, tools, message i, template.

Why: "diverged at token 212" tells a user nothing; "diverged inside message 3
(user), 40 characters in" or "inside text the template injected" names what
to fix. A chat template interleaves the messages' contents with its own
text (role headers, separators, an injected date, the rendered tools), so a
position in the rendered text is placed by finding each message's content
in order, and the tools by rendering once without them: the text that
differs is theirs. Everything else is the template's own.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# Roles whose content is the system prompt.
_SYSTEM_ROLES = frozenset({"system", "developer"})
# Characters (both renderings together) up to which the tools are found by a diff.
_DIFF_LIMIT = 40_000


@dataclass(frozen=True, slots=True)
class Span:
    """A part of the rendered prompt: [start, end) in characters."""

    start: int
    end: int
    kind: str  # "system", "message", "tools"
    index: int | None = None  # the message's index in the request
    role: str | None = None
    last: bool = False  # the request's last message (a new turn's own text)


# What a place label ends with when it is the request's last message.
LAST_MESSAGE: Final = ", the last"


@dataclass(frozen=True, slots=True)
class Place:
    """Where one character of the rendered prompt came from."""

    kind: str  # "system", "message", "tools", "template", "prompt" (a raw completion prompt)
    index: int | None = None  # the message's index
    role: str | None = None
    offset: int = 0  # characters into that part
    last: bool = False  # in the request's last message

    def describe(self) -> str:
        """A short label people read and sites group by (``message 3 (user)``).

        A divergence in the last message is marked (``message 5 (user), the
        last``): a new question parting from an earlier one after the same
        conversation is how chats go, not a cause to fix, and sites there
        rank after the others.
        """
        if self.kind in ("system", "message") and self.index is not None:
            name = "system prompt" if self.kind == "system" else f"message {self.index}"
            if self.kind == "message":
                return f"{name} ({self.role})" + (LAST_MESSAGE if self.last else "")
            return name
        if self.kind == "tools":
            return "tool definitions"
        if self.kind == "template":
            return "template text"
        return "prompt"


def kind_of_place(label: str) -> str:
    """The kind of a :meth:`Place.describe` label (rows store the label)."""
    if label == "system prompt":
        return "system"
    if label.startswith("message "):
        return "message"
    if label == "tool definitions":
        return "tools"
    if label == "template text":
        return "template"
    return "prompt"


def actionable(place: str) -> bool:
    """Whether a site's place is worth a fix (not a new turn's own last message)."""
    return not place.endswith(LAST_MESSAGE)


def message_spans(text: str, messages: Sequence[Any]) -> list[Span]:
    """Each message's content located in ``text``, in order (a content not found is skipped)."""
    spans: list[Span] = []
    pos = 0
    final = len(messages) - 1
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        found = text.find(content, pos)
        if found < 0:
            # Templates that trim a message's content (Llama 3's) render it stripped.
            content = content.strip()
            found = text.find(content, pos) if content else -1
        if found < 0:
            continue
        role = str(message.get("role", ""))
        kind = "system" if role in _SYSTEM_ROLES else "message"
        spans.append(Span(found, found + len(content), kind, index, role, index == final))
        pos = found + len(content)
    return spans


def tools_spans(with_tools: str, without_tools: str) -> list[Span]:
    """The parts of ``with_tools`` that rendering without the tools does not have.

    A template may render tools in more than one place (Llama 3.1 adds an
    "Environment" line to the system turn and the definitions to the first
    user turn), so every inserted or replaced run counts. Only the part
    between the two renderings' common head and tail is diffed; past
    ``_DIFF_LIMIT`` characters of it, one span from the first to the last
    difference stands in (a character diff is quadratic).
    """
    if with_tools == without_tools:
        return []
    head = 0
    limit = min(len(with_tools), len(without_tools))
    while head < limit and with_tools[head] == without_tools[head]:
        head += 1
    tail = 0
    while (
        tail < limit - head
        and with_tools[len(with_tools) - 1 - tail] == without_tools[len(without_tools) - 1 - tail]
    ):
        tail += 1
    end = len(with_tools) - tail
    middle_a, middle_b = without_tools[head : len(without_tools) - tail], with_tools[head:end]
    if len(middle_a) + len(middle_b) > _DIFF_LIMIT:
        return [Span(head, end, "tools")]
    # Only the part between the common head and tail is diffed: the rest is shared.
    matcher = difflib.SequenceMatcher(None, middle_a, middle_b, autojunk=False)
    return [
        Span(head + j1, head + j2, "tools")
        for tag, _, _, j1, j2 in matcher.get_opcodes()
        if tag in ("insert", "replace") and j2 > j1
    ]


def place_of(char: int, spans: Sequence[Span]) -> Place:
    """The part ``char`` falls in; a character in no span is the template's."""
    # Tools first: a template may render them inside the system turn.
    for span in sorted(spans, key=lambda s: s.kind != "tools"):
        if span.start <= char < span.end:
            return Place(span.kind, span.index, span.role, char - span.start, span.last)
    return Place("template")
