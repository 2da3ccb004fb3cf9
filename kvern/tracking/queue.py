"""The tracking thread's queue: jobs in arrival order, per-model waits, holds, errors.

Why apart from :mod:`kvern.tracking.tracker`: this is the machinery that keeps
tracking out of a request's way, whatever the tracking does. Jobs run on one
thread (:class:`~kvern.tracking.jobs.JobThread`), in the order requests reached them;
a model whose tokenizer is still loading queues its jobs until it is loaded;
while requests await their first byte, ordinary jobs step aside briefly; and
every error is counted by kind and logged once, without prompt text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.jobs import JobThread
from kvern.tracking.records import RequestContext

logger = logging.getLogger("kvern.tracking")

# A request waiting longer than this for its first byte no longer holds tracking back.
_STALE_HOLD_S = 60.0

T = TypeVar("T")


@dataclass(slots=True)
class TrackerStats:
    """Counters shown in /health and /metrics."""

    num_tracked: int = 0  # requests whose prompt reached the trie
    num_skipped_backlog: int = 0  # requests passed through untracked: tracking was behind
    num_untracked: int = 0  # requests with nothing to track (no model, odd body)
    errors: dict[str, int] = field(default_factory=dict)  # tracking errors by kind


class TrackingQueue:
    """One tracking thread and the order, backlog and hold rules of its jobs."""

    def __init__(
        self, registry: TokenizerRegistry, *, max_pending: int, max_yield_s: float
    ) -> None:
        self._registry = registry
        self._max_pending = max_pending
        # Requests sent upstream whose first byte has not been relayed yet:
        # tracking jobs wait (briefly) while any exist, so they never compete
        # for the GIL in the window a user feels as time to first token.
        # request id -> monotonic time it was sent; a hold older than
        # _STALE_HOLD_S is ignored (a response that never started relaying).
        self._holds: dict[str, float] = {}
        self._max_yield_s = max_yield_s
        self._pending = 0
        self._executor = JobThread("kvern-tracking")
        # Per model whose tokenizer is loading: actions to run, in arrival order, once loaded.
        self._waiting: dict[str, list[Callable[[ModelTokenizer], None]]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._logged_kinds: set[str] = set()
        self.stats = TrackerStats()

    def _count_error(self, kind: str, exc: BaseException) -> None:
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            # The type only: an exception message may quote prompt text.
            logger.warning("tracking error (%s): %s; counted from now on", kind, type(exc).__name__)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the tracking thread (where the tries live)."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def in_thread_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn`` on the tracking thread without waiting; errors are counted."""

        def guarded() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - never fails a request
                self._count_error("background", exc)

        self._executor.submit(guarded)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _in_order(self, model: str, action: Callable[[ModelTokenizer], None]) -> None:
        """Run ``action(tokenizer)`` now, or once the tokenizer has loaded, in arrival order."""
        waiting = self._waiting.get(model)
        if waiting is None:
            tok = self._registry.loaded(model)
            if tok is not None:
                action(tok)
                return
            waiting = self._waiting[model] = []
            self._spawn(self._load_then_release(model))
        waiting.append(action)

    async def _load_then_release(self, model: str) -> None:
        """Load a model's tokenizer off the loop, then release its queued jobs in order."""
        cancelled: asyncio.CancelledError | None = None
        try:
            tok = await self._registry.get(model)
        except asyncio.CancelledError as exc:  # shutdown: the queued jobs must still end
            cancelled = exc
            tok = ModelTokenizer(None, source=None, error="cancelled")
        except Exception as exc:  # noqa: BLE001 - the registry falls back; this is a bug guard
            self._count_error("load", exc)
            tok = ModelTokenizer(None, source=None, error=f"{type(exc).__name__}")
        for action in self._waiting.pop(model, []):
            action(tok)
        if cancelled is not None:
            raise cancelled

    def _job_done(self, _: Any) -> None:
        # Runs on the tracking thread; the counter is only a soft backlog limit.
        self._pending -= 1

    def hold(self, ctx: RequestContext) -> None:
        """``ctx`` was sent upstream and awaits its first byte (the event loop calls this)."""
        if not ctx.awaiting_first_byte:
            ctx.awaiting_first_byte = True
            self._holds[ctx.request_id] = time.perf_counter()

    def release(self, ctx: RequestContext) -> None:
        """``ctx``'s first byte was relayed, or it ended; idempotent."""
        if ctx.awaiting_first_byte:
            ctx.awaiting_first_byte = False
            self._holds.pop(ctx.request_id, None)

    def _yield_to_requests(self) -> None:
        """On the tracking thread: step aside while requests await their first byte.

        Bounded by ``max_yield_s`` so tracking still progresses under constant load.
        """
        start = time.perf_counter()
        deadline = start + self._max_yield_s
        while not self._executor.urgent_waiting:
            now = time.perf_counter()
            # list() of a dict's values runs in C under the GIL: a consistent copy.
            if now >= deadline or all(now - t > _STALE_HOLD_S for t in list(self._holds.values())):
                return
            time.sleep(0.0005)

    async def drain(self) -> None:
        """Wait for every tracking task in flight (graceful shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        self._executor.shutdown()
