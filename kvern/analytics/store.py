"""The analytics store: a bounded queue in front of one batching SQLite writer.

Why this shape (after datasette's ``database.py``): the request path must never
wait on disk, and every aiosqlite ``await`` is a round trip to its thread. So
:meth:`AnalyticsStore.record` only appends to an in-memory queue, and a single
writer task turns whatever has queued into one ``executemany`` and one commit::

    request path --record()--> queue --writer task--> executemany + commit
                   (sync, O(1),        (one batch per   (WAL: readers never
                    drops when full)    200 ms / 256)    block the writer)

Analytics is best effort while running (a full queue drops and counts, a
failed batch is counted as lost and the writer goes on) but exact at a
graceful shutdown: :meth:`AnalyticsStore.close` drains everything queued.

``flush()`` and ``close()`` put a marker in the queue behind the rows they wait
for; the queue is FIFO, so once the writer reaches the marker every earlier row
is committed. The bound on rows is kept by a counter rather than by the
queue's ``maxsize``, so a marker never takes a row's place nor waits for room.

Parity checks and events (a few rows per process) skip the queue:
:meth:`AnalyticsStore.write_one` inserts and commits directly. A lock
keeps that INSERT and commit from landing between a batch's ``executemany``
and its commit or rollback on the shared connection.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from kvern.analytics.parity_rows import INSERT_PARITY_SQL, ParityRow
from kvern.analytics.records import COLUMNS, RequestRecord, SqlValue, to_row
from kvern.analytics.schema import migrate

logger = logging.getLogger(__name__)

_INSERT_SQL = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)
_SECONDS_PER_DAY = 86_400.0


@dataclass(slots=True, eq=False)
class _Marker:
    """A place in the queue that someone waits for the writer to pass."""

    # Resolved once every row queued before this marker is committed (or lost).
    done: asyncio.Future[None]
    # True for close(): the writer ends after resolving it.
    stop: bool = False


class AnalyticsStore:
    """Records requests into SQLite off the request path; runs read queries for /analytics.

    Call :meth:`record` from the event loop's thread only (asyncio queues are
    not thread-safe).
    """

    def __init__(
        self,
        db_path: str,
        *,
        batch_size: int = 256,
        flush_interval_ms: float = 200.0,
        queue_size: int = 10_000,
        retention_days: float | None = 30.0,
        prune_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if flush_interval_ms < 0:
            raise ValueError(f"flush_interval_ms must be >= 0, got {flush_interval_ms}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if retention_days is not None and retention_days <= 0:
            raise ValueError(f"retention_days must be > 0 or None, got {retention_days}")
        self._db_path = db_path
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_ms / 1000.0
        self._queue_size = queue_size
        self._retention_s = None if retention_days is None else retention_days * _SECONDS_PER_DAY
        self._prune_interval_s = prune_interval_s
        self._clock = clock
        self._queue: asyncio.Queue[RequestRecord | _Marker] = asyncio.Queue()
        self._conn: aiosqlite.Connection | None = None
        # Held across each write transaction (batch, prune, parity row).
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._last_prune_s = 0.0
        self._logged_error_kinds: set[str] = set()
        # Counters, reported by stats().
        self.num_queued = 0
        self.num_written = 0
        self.num_dropped = 0
        self.num_lost = 0
        self.num_batches = 0
        self.num_write_errors = 0
        self.num_pruned = 0

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the database, bring its schema up to date, prune, start the writer."""
        if self._conn is not None or self._closing:
            raise RuntimeError("AnalyticsStore.start() called twice or after close()")
        if self._db_path != ":memory:" and not self._db_path.startswith("file:"):
            # A fresh machine's /var/lib/kvern/: made, not a start-up failure.
            Path(self._db_path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(self._db_path)
        try:
            # WAL: /analytics reads (and the sqlite3 shell) never block the writer.
            # NORMAL: a commit survives a crash of kvern; only a power loss can
            # lose the last batches, acceptable for analytics.
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await migrate(conn)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        await self._prune()
        self._writer = asyncio.create_task(self._run_writer(), name="kvern-analytics-writer")

    async def close(self) -> None:
        """Stop accepting rows, commit every row still queued, close the connection.

        Safe to call twice and to call concurrently; cancelling the caller does
        not cancel the drain (a lifespan timeout must not lose the tail).
        """
        self._closing = True
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._close_task)

    async def __aenter__(self) -> AnalyticsStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the request path --------------------------------------------------

    def record(self, rec: RequestRecord) -> bool:
        """Queue a row for the writer; False (and counted dropped) when full or closing.

        Synchronous and O(1) so request handling can call it inline; never raises.
        """
        if self._closing or self.num_queued >= self._queue_size:
            self.num_dropped += 1
            return False
        try:
            self._queue.put_nowait(rec)
        except Exception:  # e.g. the loop is gone; analytics must not fail a request
            self.num_dropped += 1
            return False
        self.num_queued += 1
        return True

    async def write_parity(self, row: ParityRow) -> bool:
        """Insert one parity-check row and commit (see :meth:`write_one`)."""
        return await self.write_one(INSERT_PARITY_SQL, row.to_row())

    async def write_one(self, sql: str, values: Sequence[SqlValue]) -> bool:
        """Insert one row and commit; False (counted) if not written.

        For rare rows off the request path (parity checks, events): one direct
        write instead of the batching queue. Never raises on a write error.
        """
        conn = self._conn
        if conn is None or self._closing:
            self.num_write_errors += 1
            return False
        async with self._write_lock:
            try:
                await conn.execute(sql, values)
                await conn.commit()
            except Exception as exc:
                self._note_error(exc)
                await self._rollback(conn)
                return False
        return True

    # -- waiting and reading ----------------------------------------------

    async def flush(self) -> None:
        """Return once every row recorded before this call is committed (or counted lost)."""
        writer = self._writer
        if writer is None or writer.done():
            if self._close_task is not None:
                await asyncio.shield(self._close_task)
            return
        marker = _Marker(done=asyncio.get_running_loop().create_future())
        self._queue.put_nowait(marker)
        # Waiting on the writer too: should it ever end, flush() must not hang.
        await asyncio.wait({marker.done, writer}, return_when=asyncio.FIRST_COMPLETED)

    async def fetchall(
        self, sql: str, params: Sequence[object] | Mapping[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        """Run a read query on the store's connection (for /analytics, not the request path)."""
        if self._conn is None:
            raise RuntimeError("AnalyticsStore is not started (or already closed)")
        rows = await self._conn.execute_fetchall(sql, params)
        return [tuple(row) for row in rows]

    def stats(self) -> dict[str, int]:
        """The store's counters, e.g. for /metrics and /analytics."""
        return {
            "queued": self.num_queued,
            "written": self.num_written,
            "dropped": self.num_dropped,
            "lost": self.num_lost,
            "batches": self.num_batches,
            "write_errors": self.num_write_errors,
            "pruned": self.num_pruned,
        }

    # -- the writer --------------------------------------------------------

    async def _run_writer(self) -> None:
        """Write batch after batch until a stop marker; never raises on a write error."""
        while True:
            batch, markers = await self._next_batch()
            if batch:
                await self._write(batch)
            if self._retention_s is not None and (
                self._clock() - self._last_prune_s >= self._prune_interval_s
            ):
                await self._prune()
            stop = False
            for marker in markers:
                if not marker.done.done():
                    marker.done.set_result(None)
                stop = stop or marker.stop
            if stop:
                return

    async def _next_batch(self) -> tuple[list[RequestRecord], list[_Marker]]:
        """Wait for a first item, then gather rows until full, timed out, or a marker.

        A marker ends the batch at once: whoever waits on it wants the rows
        before it committed now, not after the flush interval.
        """
        loop = asyncio.get_running_loop()
        item = await self._queue.get()
        deadline = loop.time() + self._flush_interval_s
        batch: list[RequestRecord] = []
        while True:
            if isinstance(item, _Marker):
                return batch, [item]
            self.num_queued -= 1
            batch.append(item)
            if len(batch) >= self._batch_size:
                return batch, []
            try:
                item = self._queue.get_nowait()
                continue
            except asyncio.QueueEmpty:
                pass
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return batch, []
            nxt = await self._get_within(remaining_s)
            if nxt is None:
                return batch, []
            item = nxt

    async def _get_within(self, timeout_s: float) -> RequestRecord | _Marker | None:
        """The next queue item, or None after ``timeout_s``.

        Not ``wait_for(queue.get())``: before Python 3.12 that can drop an item
        when the timeout and the get complete together. A cancelled
        ``Queue.get`` leaves its item in the queue.
        """
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter}, timeout=timeout_s)
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    async def _write(self, batch: list[RequestRecord]) -> None:
        """One executemany and one commit for the batch; errors counted, never raised."""
        conn = self._conn
        assert conn is not None, "the writer runs only between start() and close()"
        rows: list[tuple[SqlValue, ...]] = []
        for rec in batch:
            try:
                rows.append(to_row(rec))
            except TypeError as exc:
                self._note_error(exc)
                self.num_lost += 1
        if not rows:
            return
        async with self._write_lock:
            try:
                await conn.executemany(_INSERT_SQL, rows)
                await conn.commit()
            except Exception as exc:  # sqlite3.Error and anything else: keep the writer alive
                self._note_error(exc)
                self.num_lost += len(rows)
                await self._rollback(conn)
                return
        self.num_written += len(rows)
        self.num_batches += 1

    async def _prune(self) -> None:
        """Delete rows older than the retention period (by the injected clock)."""
        conn = self._conn
        if conn is None or self._retention_s is None:
            return
        now_s = self._clock()
        self._last_prune_s = now_s
        async with self._write_lock:
            try:
                cursor = await conn.execute(
                    "DELETE FROM requests WHERE ts_s < ?", (now_s - self._retention_s,)
                )
                await conn.commit()
            except Exception as exc:
                self._note_error(exc)
                await self._rollback(conn)
                return
        self.num_pruned += max(cursor.rowcount, 0)

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        try:
            await conn.rollback()
        except Exception as exc:
            self._note_error(exc)

    def _note_error(self, exc: BaseException) -> None:
        """Count a write error and log each kind once.

        Only SQLite's messages and :func:`to_row`'s are logged in full: they
        name tables, columns and types, never a row's values. Anything else is
        logged by type alone, as its message could quote request data.
        """
        self.num_write_errors += 1
        kind = type(exc).__name__
        if isinstance(exc, (sqlite3.Error, TypeError)):
            kind = f"{kind}: {exc}"
        if kind in self._logged_error_kinds:
            return
        self._logged_error_kinds.add(kind)
        logger.warning("analytics write failed (logged once per kind): %s", kind)

    async def _shutdown(self) -> None:
        """Drain the queue behind a stop marker, then close the connection."""
        writer = self._writer
        if writer is not None and not writer.done():
            marker = _Marker(done=asyncio.get_running_loop().create_future(), stop=True)
            self._queue.put_nowait(marker)
            try:
                await writer
            except Exception as exc:  # the writer should never fail; drain below anyway
                self._note_error(exc)
        if self._conn is not None:
            # Rows left if the writer ended early: write them here, same batching.
            await self._write_all(self._drain_queue())
            await self._conn.close()
            self._conn = None
        else:
            leftover = self._drain_queue()
            self.num_lost += len(leftover)

    def _drain_queue(self) -> list[RequestRecord]:
        rows: list[RequestRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return rows
            if isinstance(item, _Marker):
                if not item.done.done():
                    item.done.set_result(None)
            else:
                self.num_queued -= 1
                rows.append(item)

    async def _write_all(self, rows: Iterable[RequestRecord]) -> None:
        pending = list(rows)
        for start in range(0, len(pending), self._batch_size):
            await self._write(pending[start : start + self._batch_size])
