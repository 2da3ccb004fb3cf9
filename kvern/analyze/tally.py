"""What one pass counts, for the whole log and per (model, tenant): tokens reused and why not.

Why one record for every level: the totals, each group and each what-if
run are read the same way, and every one of them adds up exactly as a
request's breakdown does (:mod:`kvern.diagnosis.reasons`)::

    prompt_tokens == reused_tokens + sum(reasons[r].tokens for every reason r, novel included)

``reusable_any_tokens`` is what any earlier prompt shared (the trie's match),
``reusable_tokens`` the same in whole KV blocks -- what a backend with room
for everything would reuse; ``reused_tokens`` is that unless a cache
capacity was given (``--capacity-tokens``), where the LRU decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvern.diagnosis.reasons import REASONS, Breakdown


@dataclass(slots=True)
class Tally:
    """Requests and prompt tokens, reused and lost by reason."""

    requests: int = 0
    prompt_tokens: int = 0
    reusable_any_tokens: int = 0  # shared with an earlier prompt, any length
    reusable_tokens: int = 0  # the same, in whole blocks
    reused_tokens: int = 0  # what the (modelled) backend cache reused
    reason_requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    reason_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def add(self, prompt_tokens: int, matched: int, aligned: int, b: Breakdown) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.reusable_any_tokens += matched
        self.reusable_tokens += aligned
        self.reused_tokens += b.reused
        for reason, tokens in (
            (b.miss_reason, b.miss_tokens),
            (b.lost_reason, b.lost_tokens),
            ("novel", b.novel_tokens),
        ):
            if reason is not None and tokens > 0:
                self.reason_requests[reason] += 1
                self.reason_tokens[reason] += tokens

    @property
    def lost_tokens(self) -> int:
        """Prompt tokens not reused (every reason's, novel included)."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def diverged_tokens(self) -> int:
        return self.reason_tokens["diverged"]

    @property
    def adds_up(self) -> bool:
        return self.reused_tokens + sum(self.reason_tokens.values()) == self.prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "reusable_any_tokens": self.reusable_any_tokens,
            "reusable_tokens": self.reusable_tokens,
            "reused_tokens": self.reused_tokens,
            "lost_tokens": self.lost_tokens,
            "reasons": {
                r: {"requests": self.reason_requests[r], "tokens": self.reason_tokens[r]}
                for r in REASONS
            },
            "adds_up": self.adds_up,
        }

    def summary(self) -> dict[str, int]:
        """The figures a what-if compares."""
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "reusable_tokens": self.reusable_tokens,
            "reused_tokens": self.reused_tokens,
            "diverged_tokens": self.diverged_tokens,
        }
