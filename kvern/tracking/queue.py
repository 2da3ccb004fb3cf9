"""The tracking thread's queue: jobs in arrival order, per-model waits, backlog, errors.

Why apart from :mod:`kvern.tracking.tracker`: this is the machinery that keeps
tracking out of a request's way, whatever the tracking does. Jobs run on one
thread (:class:`~kvern.tracking.jobs.JobThread`), in the order requests reached them;
a model whose tokenizer is still loading queues its jobs until it is loaded;
and every error is counted by kind and logged once, without prompt text.
Nothing here steps aside for requests: the thread runs in the brain, away from
the relay's event loop (see :mod:`kvern.tracking.brain`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.jobs import JobThread

logger = logging.getLogger("kvern.tracking")

T = TypeVar("T")


@dataclass(slots=True)
class TrackerStats:
    """Counters shown in /health and /metrics."""

    num_tracked: int = 0  # requests whose prompt reached the trie
    num_skipped_backlog: int = 0  # requests passed through untracked: tracking was behind
    num_untracked: int = 0  # requests with nothing to track (no model, odd body)
    errors: dict[str, int] = field(default_factory=dict)  # tracking errors by kind
    # Work not done for a request, by reason (prompt_over_context, answer_over_context).
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class TrackingQueue:
    """One tracking thread and the order and backlog rules of its jobs."""

    def __init__(self, registry: TokenizerRegistry, *, max_pending: int) -> None:
        self._registry = registry
        self._max_pending = max_pending
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

    async def in_thread(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run ``fn`` on the tracking thread (where the tries live).

        ``urgent``: ahead of queued bookkeeping (reads for the admin endpoints,
        which answer with what is there rather than wait out a backlog).
        """
        return await asyncio.wrap_future(self._executor.submit(fn, *args, urgent=urgent))

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

    @property
    def backlog(self) -> int:
        """Prediction jobs queued or running (a soft count)."""
        return self._pending

    def _job_done(self, _: Any) -> None:
        # Runs on the tracking thread; the counter is only a soft backlog limit.
        self._pending -= 1

    def waiting_for_tokenizer(self) -> dict[str, int]:
        """Model -> jobs queued until its tokenizer has loaded (what a drain may wait on)."""
        return {model: len(actions) for model, actions in self._waiting.items()}

    async def drain_within(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the tracking tasks in flight now; True: all ended.

        Only the tasks that exist at the call: under steady traffic new ones
        keep coming, and the caller (an admin endpoint) asks about what was
        handed over before it, never about what comes after.
        """
        tasks = list(self._tasks)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        return not pending

    async def drain(self) -> None:
        """Wait for every tracking task in flight (graceful shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        self._executor.shutdown()
