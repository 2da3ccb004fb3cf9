"""Capture: forwarded request bodies appended as JSONL, one OpenAI Batch API input line each.

Why the Batch format: ``kvern analyze`` replays traffic offline (other rules,
another eviction policy, another block size), and a Batch input file is what
people already hold of their traffic. One reader then takes a capture and a
Batch file alike; kvern's own facts ride in an extra ``kvern`` key::

    {"custom_id": "kv-...", "method": "POST", "url": "/v1/chat/completions",
     "body": {...the client's JSON body, as sent...},
     "kvern": {"ts_s": ..., "tenant": "key:...", "end_user": "user:...", "endpoint": "chat"}}

The file holds prompt text, system prompts included: capture is off unless
``analytics.capture`` is set, the file is mode 0600, and the tenant is the
keyed hash kvern computes, never the API key (headers are never written).

Why a thread of its own, not the analytics store's writer: that writer runs on
the relay's event loop, where a blocking file write (a slow or full disk, a
32 MiB body) would stall every stream in flight. The request path only
appends a reference to the body it already holds::

    request path --offer()--> bounded deque --writer thread--> <path> (0600)
                  (O(1); full: dropped,     (one line a       rotated to <path>.1
                   counted)                  request)          before passing max_mb)

Capture never slows or fails a request: a full queue drops the body (counted
in ``/health`` and ``kvern_capture_dropped_total``), and a write error is
logged once and turns capture off for the rest of the process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

logger = logging.getLogger(__name__)

# The tracked endpoints kvern captures, and the URL each is written under.
URLS: Final[dict[str, str]] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "ollama_chat": "/api/chat",
    "ollama_generate": "/api/generate",
}
# Bodies waiting for the writer, at most: so many, and so many bytes together.
QUEUE_ITEMS: Final[int] = 1024
QUEUE_BYTES: Final[int] = 64 * 1024 * 1024
_MIB: Final[int] = 1024 * 1024


class Captured(Protocol):
    """What a capture line says of its request (:class:`kvern.tracking.records.RequestContext`)."""

    request_id: str
    ts_s: float
    endpoint: str
    tenant: str | None
    end_user: str | None


@dataclass(slots=True)
class _Item:
    """One body waiting for the writer, with what its line says besides."""

    request_id: str  # kvern's request id: the line's custom_id
    url: str  # the endpoint's path
    meta: dict[str, Any]  # the line's "kvern" object
    raw: bytes  # the client's body, as received (parsed as a JSON object by the relay)


class CaptureFile:
    """The JSONL file: appended to, renamed to ``<path>.1`` before it would pass ``max_bytes``.

    Used by the writer thread alone. A line longer than ``max_bytes`` still
    goes in, as the only line of a fresh file: losing the largest requests
    would bias what ``kvern analyze`` sees.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.num_rotations = 0
        self._fd: int | None = None
        self._size = 0

    def open(self) -> None:
        """Open (or create) the file for appending, mode 0600 whatever it had."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a file that existed may have been readable by others
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, line: bytes) -> None:
        """Write one whole line, rotating first if it would take the file past the cap."""
        if self._fd is None:
            self.open()
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self.rotate()
        assert self._fd is not None
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(line)

    def rotate(self) -> None:
        """``<path>`` becomes ``<path>.1`` (replacing it) and a new, empty file is begun."""
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self.num_rotations += 1
        self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Capture:
    """The queue of bodies and the thread that appends them to a :class:`CaptureFile`.

    :meth:`offer` may be called from the event loop (or any thread); it never
    blocks on the writer and never raises.
    """

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int,
        queue_items: int = QUEUE_ITEMS,
        queue_bytes: int = QUEUE_BYTES,
        file: CaptureFile | None = None,
    ) -> None:
        self._file = file or CaptureFile(Path(path), max_bytes)
        self._queue_items = queue_items
        self._queue_bytes = queue_bytes
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why capture turned itself off
        # Counters (under the condition's lock), reported by stats().
        self.num_written = 0
        self.num_dropped_full = 0  # the writer was behind: the queue was full
        self.num_dropped_off = 0  # offered after a write error turned capture off

    @classmethod
    def from_config(cls, path: str, max_mb: float) -> Capture:
        return cls(path, max_bytes=max(1, int(max_mb * _MIB)))

    @property
    def path(self) -> Path:
        return self._file.path

    def start(self) -> None:
        """Open the file (an error turns capture off, logged) and start the writer thread."""
        try:
            self._file.open()
        except OSError as exc:
            self._fail(exc)
            return
        self._thread = threading.Thread(target=self._run, name="kvern-capture", daemon=True)
        self._thread.start()

    def offer(self, ctx: Captured, raw: bytes) -> bool:
        """Queue the body of a tracked endpoint for capture; False when it was not queued."""
        url = URLS.get(ctx.endpoint)
        if url is None or not raw:
            return False
        try:
            meta = {
                "ts_s": ctx.ts_s,
                "tenant": ctx.tenant,
                "end_user": ctx.end_user,
                "endpoint": ctx.endpoint,
            }
            item = _Item(ctx.request_id, url, meta, raw)
            with self._wake:
                if self.error is not None or self._closing:
                    self.num_dropped_off += 1
                    return False
                if (
                    len(self._queue) >= self._queue_items
                    or self._queued_bytes + len(raw) > self._queue_bytes
                ):
                    self.num_dropped_full += 1
                    return False
                self._queue.append(item)
                self._queued_bytes += len(raw)
                self._wake.notify()
            return True
        except Exception:  # noqa: BLE001 - capture never fails a request
            logger.exception("capture: offering a body failed")
            return False

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, stop the writer, close the file (it blocks: not on the loop)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._file.close()

    def stats(self) -> dict[str, Any]:
        """For /health (under analytics) and /metrics."""
        with self._wake:
            return {
                "path": str(self._file.path),
                "enabled": self.error is None,
                "written": self.num_written,
                "dropped": self.num_dropped_full + self.num_dropped_off,
                "dropped_queue_full": self.num_dropped_full,
                "dropped_disabled": self.num_dropped_off,
                "queued": len(self._queue),
                "rotations": self._file.num_rotations,
                "error": self.error,
            }

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return  # closing, and everything queued is written
                item = self._queue.popleft()
                self._queued_bytes -= len(item.raw)
            try:
                self._file.append(_line(item))
            except Exception as exc:  # noqa: BLE001 - OSError, or a body that cannot be encoded
                self._fail(exc, lost=1)
                return
            with self._wake:
                self.num_written += 1

    def _fail(self, exc: BaseException, lost: int = 0) -> None:
        """Turn capture off: logged once; what is queued (and ``lost``) is dropped, counted."""
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else type(exc).__name__
        with self._wake:
            self.error = why
            self.num_dropped_off += len(self._queue) + lost
            self._queue.clear()
            self._queued_bytes = 0
        logger.error("kvern: capture to %s turned off: %s", self._file.path, why)
        try:
            self._file.close()
        except OSError:
            pass


def _line(item: _Item) -> bytes:
    """One JSONL line: the client's body spliced in as received, on one line."""
    head = json.dumps({"custom_id": item.request_id, "method": "POST", "url": item.url})
    meta = json.dumps(item.meta)
    parts = (head[:-1].encode(), b', "body": ', _one_line(item.raw), b', "kvern": ', meta.encode())
    return b"".join((*parts, b"}\n"))


def _one_line(raw: bytes) -> bytes:
    """The body as UTF-8 JSON text on one line, without parsing it again where it can be helped.

    The relay's ``json.loads`` accepted it, and strict JSON has no raw line
    breaks inside strings: any CR or LF is whitespace between tokens, so a
    space serves as well. A body in UTF-16/32 (or not strictly UTF-8) is
    re-encoded instead.
    """
    encoding = json.detect_encoding(raw)
    if encoding == "utf-8-sig":
        raw = raw[3:]
    if encoding in ("utf-8", "utf-8-sig"):
        try:
            raw.decode("utf-8")  # strict: json.loads lets a UTF-8-encoded lone surrogate through
        except UnicodeDecodeError:
            pass
        else:
            return raw.strip().replace(b"\r", b" ").replace(b"\n", b" ")
    return json.dumps(json.loads(raw)).encode()  # ASCII, with escapes
