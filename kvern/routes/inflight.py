"""Requests between arrival and their analytics row: what a graceful shutdown waits for and ends.

Why: on SIGTERM kvern stops accepting, lets what is in flight finish for
``proxy.shutdown_grace_s``, then ends the rest itself, each with an answer
the client can read and a row, before tracking closes. Ending is done in the
way that is safe at each stage:

- still sending (no byte of the answer yet): the request's task is cancelled;
  the proxy turns that into a 503 ``shutting_down`` (nothing reached the
  client, so a retry elsewhere is safe);
- relaying an answer: the upstream connection is closed under it, so the
  relay's next read fails and it ends the answer as for any upstream cut (an
  error event in a stream), marked ``shutting_down``.

No cancellation reaches a relay mid-send, where it could not be answered.
The lifespan then waits (bounded) until every entry has left, so each row is
handed to tracking before tracking shuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)

CUT_MESSAGE = "kvern is shutting down"


@dataclass(slots=True)
class Entry:
    """One request in flight."""

    task: asyncio.Task[object] | None  # the task serving it (cancelled while it is sending)
    response: httpx.Response | None = None  # the upstream answer being relayed, once there
    cut: bool = False  # ended by the shutdown, not by the client or the upstream


class InFlight:
    """Every request from arrival to its row; ends them all on demand."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.cutting = False  # once set, new requests are ended as they come

    def __len__(self) -> int:
        return len(self._entries)

    def enter(self, request_id: str) -> Entry:
        """Register the request served by the current task."""
        entry = Entry(asyncio.current_task())
        self._entries[request_id] = entry
        return entry

    def relaying(self, entry: Entry, response: httpx.Response) -> None:
        """The answer is being relayed: from now on, ending it closes its upstream connection."""
        entry.response = response
        if entry.cut:
            self._close(response)

    def leave(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def cut_all(self) -> int:
        """End every request in flight (see the module docstring); returns how many."""
        self.cutting = True
        entries = list(self._entries.values())
        for entry in entries:
            if entry.cut:
                continue
            entry.cut = True
            if entry.response is not None:
                self._close(entry.response)
            elif entry.task is not None and entry.task is not asyncio.current_task():
                entry.task.cancel(CUT_MESSAGE)
        if entries:
            logger.warning(
                "shutdown grace over: ending %d request(s) still in flight", len(entries)
            )
        return len(entries)

    def _close(self, response: httpx.Response) -> None:
        # Closing the socket makes the relay's pending read fail at once;
        # closing only the response would wait for that read to return.
        stream = response.extensions.get("network_stream")
        closer = getattr(stream, "aclose", None) or response.aclose
        task = asyncio.ensure_future(_quietly(closer()))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until every request has left (its row handed over); False if not in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._entries and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self._entries


async def _quietly(closing: object) -> None:
    with contextlib.suppress(Exception):
        await closing  # type: ignore[misc]
