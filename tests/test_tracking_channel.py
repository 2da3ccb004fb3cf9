"""The channel between relay and brain: order, raw blobs, the bound, a peer that goes away."""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from kvern.tracking.channel import Inbox, Outbox, QueueConnection


def pipe() -> tuple[Connection, Connection]:
    r, w = os.pipe()
    return Connection(r, writable=False), Connection(w, readable=False)


class Collector:
    def __init__(self) -> None:
        self.got: list[tuple[Any, bytes | None]] = []
        self.closed = threading.Event()

    def deliver(self, header: Any, blob: bytes | None) -> None:
        self.got.append((header, blob))

    def on_closed(self) -> None:
        self.closed.set()


def test_messages_and_their_blobs_arrive_in_order_over_a_pipe() -> None:
    reader, writer = pipe()
    got = Collector()
    inbox = Inbox(reader, got.deliver, on_closed=got.on_closed, name="t-in")
    outbox = Outbox(writer, max_messages=100, name="t-out")
    big = os.urandom(3 * 1024 * 1024)  # larger than a pipe's buffer
    assert outbox.put(("first", 1))
    assert outbox.put({"second": [2]}, big)
    assert outbox.put("third", b"")
    outbox.close(timeout_s=10)  # sends what is queued, then closes its end
    assert got.closed.wait(10)
    inbox.join(5)
    assert got.got == [(("first", 1), None), ({"second": [2]}, big), ("third", b"")]
    assert outbox.num_sent == 3


def test_a_full_outbox_refuses_instead_of_blocking_but_forced_messages_queue() -> None:
    reader, writer = pipe()  # nobody reads: the sender thread blocks once the pipe is full
    outbox = Outbox(writer, max_messages=2, name="t-out")
    blob = b"x" * (256 * 1024)
    accepted = 0
    started = time.perf_counter()
    for _ in range(10):
        accepted += outbox.put("m", blob)
    assert time.perf_counter() - started < 1.0  # put never waited on the pipe
    assert 2 <= accepted < 10
    assert outbox.put("control", force=True)
    reader.close()  # the peer goes away: the blocked write fails, the outbox breaks
    deadline = time.monotonic() + 10
    while not outbox.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outbox.broken
    assert not outbox.put("after", force=True)


def test_an_inbox_reports_once_when_its_peer_is_gone() -> None:
    reader, writer = pipe()
    got = Collector()
    calls: list[int] = []

    def closed() -> None:
        calls.append(1)
        got.on_closed()

    Inbox(reader, got.deliver, on_closed=closed, name="t-in")
    writer.close()
    assert got.closed.wait(10)
    time.sleep(0.05)
    assert calls == [1] and got.got == []


def test_queue_connections_carry_the_same_frames_in_one_process() -> None:
    reader, writer = QueueConnection.pair()
    got = Collector()
    Inbox(reader, got.deliver, on_closed=got.on_closed, name="t-in")
    outbox = Outbox(writer, max_messages=10, name="t-out")
    outbox.put("a", b"blob")
    outbox.put("b")
    outbox.close(timeout_s=5)
    assert got.closed.wait(5)
    assert got.got == [("a", b"blob"), ("b", None)]
