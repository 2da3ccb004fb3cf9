"""Requests handed to the brain whose analytics rows have not come back yet.

Why kept on the relay: the brain writes a request's row once it has settled
it, but a brain may die or hang with requests in hand. Every request still
gets its row: one whose answer had already ended is written here, without
tracking figures, the moment its brain is lost; one still running writes its
own when it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.tracking.records import Outcome, RequestContext, to_record
from kvern.upstream.usage import ResponseFacts

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    ctx: RequestContext
    outcome: Outcome | None = None  # set once its Complete was sent


class PendingRows:
    """Request id -> what the relay must know to write the row itself (loop thread only)."""

    def __init__(self, record: Callable[[RequestRecord], Any] | None) -> None:
        self._record = record
        self._pending: dict[str, _Pending] = {}
        self.num_untracked = 0  # rows written here, without the brain's figures

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def num_owed(self) -> int:
        """Answered requests whose row the brain still owes (what a drain waits for)."""
        return sum(1 for p in self._pending.values() if p.outcome is not None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._pending

    def handed(self, ctx: RequestContext) -> None:
        """The brain got a Begin or an Ask for ``ctx``."""
        self._pending.setdefault(ctx.request_id, _Pending(ctx))

    def completed(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The brain got ``ctx``'s Complete; its row comes back next."""
        self._pending[ctx.request_id] = _Pending(ctx, outcome)

    def returned(self, request_id: str) -> None:
        """The brain sent the row."""
        self._pending.pop(request_id, None)

    def brain_lost(self) -> None:
        """Write the rows the lost brain owed; forget the rest (they write their own)."""
        owed = [p for p in self._pending.values() if p.outcome is not None]
        self._pending.clear()
        for pending in owed:
            assert pending.outcome is not None
            self.write_untracked(pending.ctx, pending.outcome)

    def write_untracked(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The row of a request the brain never settled: no tracking figures, never raises."""
        self._pending.pop(ctx.request_id, None)
        self.num_untracked += 1
        self.write_plain(ctx, outcome)

    def write_plain(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The row of a request with nothing to track (no model, another endpoint); never raises."""
        if self._record is None:
            return
        try:
            self._record(to_record(ctx, None, ResponseFacts(), outcome))
        except Exception:  # noqa: BLE001 - analytics never fails a request
            logger.exception("writing an untracked row failed")
