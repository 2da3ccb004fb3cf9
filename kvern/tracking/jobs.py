"""One worker thread with two lanes: urgent jobs run before queued ordinary ones.

Why not a ``ThreadPoolExecutor(max_workers=1)``: tracking jobs (tokenize,
walk the trie, settle an answer) queue in arrival order and may wait behind
each other, but a routing decision is on a request's path to its upstream:
it must not wait behind a backlog of bookkeeping. Both lanes run on the same
thread, so the trie still has exactly one writer and needs no lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class JobThread:
    """A single daemon thread running submitted callables, urgent lane first."""

    def __init__(self, name: str) -> None:
        self._urgent: deque[_Job] = deque()
        self._normal: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def urgent_waiting(self) -> bool:
        """True while an urgent job is queued (a running job may cut a wait short)."""
        return bool(self._urgent)

    def submit(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> Future[T]:
        """Queue ``fn(*args)``; its result or exception lands in the returned future."""
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("job thread is shut down")
            (self._urgent if urgent else self._normal).append((future, fn, args))
            self._ready.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._urgent and not self._normal:
                    if self._closed:
                        return
                    self._ready.wait()
                future, fn, args = (self._urgent or self._normal).popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Run what is queued, then stop the thread and wait for it."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()
