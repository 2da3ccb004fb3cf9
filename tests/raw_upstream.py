"""A scripted HTTP/1.1 upstream on a raw asyncio socket, for faults no framework would commit.

Why raw: the faults that matter here live below HTTP frameworks -- a
kept-alive connection closed as the next request arrives, half a status line,
a reset in the middle of a body. The script sees each request with the number
of its connection and its place on that connection, and answers with bytes
(or none), then keeps the connection, closes it (FIN) or resets it (RST).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

CHAT = {
    "id": "x",
    "object": "chat.completion",
    "model": "sim",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}
MODELS = {"object": "list", "data": [{"id": "sim"}]}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the upstream read it."""

    connection: int  # 1 for the first connection accepted, and so on
    number: int  # its place on that connection: 1 for a fresh one
    method: str
    path: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    """What the upstream does with a request: send ``data``, then keep, close or reset."""

    data: bytes
    close: bool = False  # FIN after ``data``
    reset: bool = False  # RST after ``data`` (and a short pause, so ``data`` is read first)
    then: tuple[tuple[float, bytes], ...] = ()  # (pause in s, bytes): sent after ``data``


def answer(payload: dict[str, Any], *, status: int = 200) -> bytes:
    """A whole kept-alive JSON answer."""
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


def normal(seen: Seen) -> Reply:
    """What a healthy OpenAI-compatible server answers."""
    return Reply(answer(MODELS if seen.path.endswith("/models") else CHAT))


@dataclass
class RawUpstream:
    """The running upstream: its URL and every request it read, in order."""

    url: str
    seen: list[Seen] = field(default_factory=list)

    def places(self) -> list[tuple[int, int]]:
        """(connection, number) of each chat request read: which were fresh, which reused."""
        return [(s.connection, s.number) for s in self.seen if s.method == "POST"]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return method, path, body


@contextmanager
def raw_upstream(
    script: Callable[[Seen], Reply] = normal, *, port: int = 0
) -> Iterator[RawUpstream]:
    """Serve ``script`` on 127.0.0.1 in a thread of its own; yields the running upstream."""
    loop = asyncio.new_event_loop()
    connections = 0
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        connection, number = connections, 0
        try:
            while (request := await _read_request(reader)) is not None:
                number += 1
                seen = Seen(connection, number, *request)
                upstream.seen.append(seen)
                reply = script(seen)
                try:
                    writer.write(reply.data)
                    await writer.drain()
                    for pause_s, more in reply.then:
                        await asyncio.sleep(pause_s)
                        writer.write(more)
                        await writer.drain()
                except ConnectionError:
                    return  # the client left (kvern cancelled, or cut the answer)
                if reply.reset:
                    await asyncio.sleep(0.2)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if reply.close:
                    break
        except asyncio.CancelledError:
            # The upstream stopping with a connection still open (kvern's
            # pooled one, if its close has not arrived yet): end quietly, or
            # asyncio logs the cancelled handler as an error, and tests that
            # assert a clean log would blame kvern for it.
            return
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await server.serve_forever()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10), "the raw upstream did not start"
    upstream = RawUpstream(f"http://127.0.0.1:{holder['port']}")
    try:
        yield upstream
    finally:

        def stop() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(stop)
        thread.join(timeout=10)
        loop.close()
