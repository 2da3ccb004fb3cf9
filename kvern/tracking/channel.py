"""A framed, bounded, one-way message channel between the relay and the brain.

Why threads at both ends: the relay's event loop must never block on the
brain. ``put`` only appends to a bounded outbox (False when it is full: the
caller counts the request as skipped); a sender thread pickles the small
header and writes it, and the large part of a message (a request or answer
body) goes as a separate raw frame, so it is never copied into a pickle. A
receiver thread reads frames and hands each message to a callback (on the
relay: ``loop.call_soon_threadsafe``). Writes and reads of a pipe release the
GIL; only the pickling of headers (tens of microseconds) holds it.

A message is ``(header, blob)``: any picklable header, and ``bytes`` or None.
Closing ends the sender after what is queued; a peer that went away ends the
receiver, which calls ``on_closed`` once.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

Message = tuple[Any, bytes | None]


class Conn(Protocol):
    """What the channel needs of a connection (a pipe end, or :class:`QueueConnection`)."""

    def send_bytes(self, buf: bytes) -> None: ...

    def recv_bytes(self) -> bytes: ...

    def close(self) -> None: ...


_FLAG_BLOB = b"B"
_FLAG_NONE = b"N"


class Outbox:
    """The sending end: a bounded queue drained by one thread into a connection."""

    def __init__(self, conn: Conn, *, max_messages: int, name: str) -> None:
        self._conn = conn
        self._max = max_messages
        self._queue: deque[Message | None] = deque()
        self._ready = threading.Condition()
        self._broken = False
        self.num_sent = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def broken(self) -> bool:
        return self._broken

    def put(self, header: Any, blob: bytes | None = None, *, force: bool = False) -> bool:
        """Queue a message; False (and nothing queued) when full or broken.

        ``force`` ignores the bound (control messages: a reply, shutdown).
        """
        with self._ready:
            if self._broken or (not force and len(self._queue) >= self._max):
                return False
            self._queue.append((header, blob))
            self._ready.notify()
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued, then stop (``timeout_s``: how long to wait for that)."""
        with self._ready:
            self._queue.append(None)
            self._ready.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                item = self._queue.popleft()
            if item is None:
                break
            header, blob = item
            try:
                flag = _FLAG_NONE if blob is None else _FLAG_BLOB
                self._conn.send_bytes(flag + pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL))
                if blob is not None:
                    self._conn.send_bytes(blob)
                self.num_sent += 1
            except (OSError, ValueError):  # the peer went away
                with self._ready:
                    self._broken = True
                    self._queue.clear()
                break
        try:
            self._conn.close()
        except OSError:
            pass


class Inbox:
    """The receiving end: one thread reading messages and handing each to ``deliver``."""

    def __init__(
        self,
        conn: Conn,
        deliver: Callable[[Any, bytes | None], None],
        *,
        on_closed: Callable[[], None],
        name: str,
    ) -> None:
        self._conn = conn
        self._deliver = deliver
        self._on_closed = on_closed
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while True:
                frame = self._conn.recv_bytes()
                header = pickle.loads(frame[1:])
                blob = self._conn.recv_bytes() if frame[:1] == _FLAG_BLOB else None
                self._deliver(header, blob)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError):
            pass
        finally:
            try:
                self._conn.close()
            except OSError:
                pass
            self._on_closed()


def fd_connection(fd: int, *, readable: bool) -> Connection:
    """A :class:`Connection` over an inherited pipe end (``--fd`` arguments of the brain)."""
    os.set_inheritable(fd, False)
    return Connection(fd, readable=readable, writable=not readable)


class QueueConnection:
    """An in-process stand-in for a pipe end (the brain on a thread, for tests).

    Only what :class:`Outbox` and :class:`Inbox` call: ``send_bytes``,
    ``recv_bytes`` and ``close``. Closing either end ends the reader.
    """

    _EOF = object()

    def __init__(self, q: queue.SimpleQueue[Any]) -> None:
        self._q = q

    @classmethod
    def pair(cls) -> tuple[QueueConnection, QueueConnection]:
        """(reader, writer) over one queue."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        return cls(q), cls(q)

    def send_bytes(self, data: bytes) -> None:
        self._q.put(bytes(data))

    def recv_bytes(self) -> bytes:
        item = self._q.get()
        if item is self._EOF:
            self._q.put(item)
            raise EOFError
        return bytes(item)

    def close(self) -> None:
        self._q.put(self._EOF)
