"""The relay's copy of the parity reports: stored, logged and shown as the brain sends them.

Why on the relay: the checks run in the brain (they render with its
tokenizers), but the analytics store, the log a person reads and ``/health``
are the relay's. Each report is written as a row before it shows in
``/health``, so what /health shows is in the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kvern.analytics.store import AnalyticsStore
from kvern.parity.checker import ParityReport, log_report


class ParityReports:
    """Model name -> latest :class:`ParityReport`, fed by the brain's messages (loop thread)."""

    def __init__(
        self, store: AnalyticsStore | None, wait_checks: Callable[[], Awaitable[Any]]
    ) -> None:
        """``wait_checks()`` returns once the brain has no check running or scheduled."""
        self._store = store
        self._wait_checks = wait_checks
        self._reports: dict[str, ParityReport] = {}
        self._writes: set[asyncio.Task[None]] = set()

    def receive(self, report: ParityReport, final: bool) -> None:
        """A report from the brain: store it, then show it; log it if it is the last one."""
        if final:
            log_report(report)
        task = asyncio.ensure_future(self._keep(report))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _keep(self, report: ParityReport) -> None:
        if self._store is not None:
            await self._store.write_parity(report.to_row())
        self._reports[report.model] = report

    def reports(self) -> dict[str, ParityReport]:
        """The latest report per model name, in name order."""
        return dict(sorted(self._reports.items()))

    async def wait(self) -> None:
        """Return once no check is running in the brain and every report is kept (tests, tools)."""
        await self._wait_checks()
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
