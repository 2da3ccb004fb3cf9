"""Normalization: ordered regex -> placeholder rules applied before trie keying.

Why: prefix reuse breaks at the first differing token. A timestamp, a request
id or the date a chat template injects (Llama 3.x renders ``Today Date: 23 Nov
2026`` into the system turn) makes otherwise identical prompts diverge early,
so the trie would report no reuse for prompts that differ only in noise.
Replacing such spans with a stable placeholder shows the reuse the traffic
*would* get once the noise is moved out of the prefix.

The request sent upstream is never changed: these rules only shape what kvern
tokenizes and keys its trie with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvern.config import NormalizationRule

_FLAG_VALUES = {"IGNORECASE": re.IGNORECASE, "MULTILINE": re.MULTILINE, "DOTALL": re.DOTALL}


@dataclass(slots=True)
class CompiledRule:
    """One rule, compiled."""

    regex: re.Pattern[str]  # the compiled pattern
    replacement: str  # placeholder text (may use \\1 group references)
    scope: str  # "messages" or "prompt"


@dataclass(slots=True)
class Normalizer:
    """The ordered rules of one model, split by where they apply."""

    message_rules: list[CompiledRule] = field(default_factory=list)  # before rendering
    prompt_rules: list[CompiledRule] = field(default_factory=list)  # on the rendered prompt

    @classmethod
    def from_rules(cls, rules: Sequence[NormalizationRule]) -> Normalizer:
        """Compile ``rules`` in order (patterns were validated when the config loaded)."""
        out = cls()
        for rule in rules:
            flags = 0
            for name in rule.flags:
                flags |= _FLAG_VALUES[name]
            compiled = CompiledRule(re.compile(rule.pattern, flags), rule.replacement, rule.scope)
            (out.message_rules if rule.scope == "messages" else out.prompt_rules).append(compiled)
        return out

    @property
    def is_empty(self) -> bool:
        return not self.message_rules and not self.prompt_rules

    def text(self, value: str) -> str:
        """Apply the message-scope rules to one piece of message text."""
        for rule in self.message_rules:
            value = rule.regex.sub(rule.replacement, value)
        return value

    def prompt(self, value: str) -> str:
        """Apply the prompt-scope rules to a rendered prompt."""
        for rule in self.prompt_rules:
            value = rule.regex.sub(rule.replacement, value)
        return value

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Return copies of ``messages`` with message-scope rules applied to their text.

        Text is found in string ``content`` and in ``{"type": "text"}`` parts;
        the input is never mutated (it is the client's request).
        """
        if not self.message_rules:
            return list(messages)
        out: list[dict[str, Any]] = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": self.text(content)}
            elif isinstance(content, list):
                parts = [
                    {**part, "text": self.text(part["text"])}
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                    else part
                    for part in content
                ]
                message = {**message, "content": parts}
            out.append(message)
        return out
