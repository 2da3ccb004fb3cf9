"""Label values that come from clients, held to a bound.

Why: a Prometheus series per distinct label value lives as long as the
process, and model names and tenants come from clients. A client sending a
new model name per request would otherwise grow kvern's memory and every
scrape without bound (the classic cardinality explosion). The first ``limit``
values seen keep series of their own; every later one is counted under
:data:`OTHER`, so totals stay right and only the split is coarser.
"""

from __future__ import annotations

from typing import Final

# The label value every value past the bound is counted under.
OTHER: Final = "__other__"


class CappedLabel:
    """The first ``limit`` distinct values pass as they are; later ones become ``__other__``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._seen: set[str] = set()

    def value(self, raw: str | None) -> str:
        """The label value to use for ``raw`` (None and "" are ``-``)."""
        if not raw:
            return "-"
        if raw in self._seen:
            return raw
        if len(self._seen) < self._limit:
            self._seen.add(raw)
            return raw
        return OTHER

    def __len__(self) -> int:
        return len(self._seen)
