"""A scripted vLLM KV events publisher on 127.0.0.1, for the tests of kvern's subscribers.

vLLM's ``ZmqEventPublisher`` in miniature: PUB frames (an XPUB here, so a
test waits for the subscriber's subscription instead of sleeping past
ZeroMQ's slow joiner) and a ROUTER replaying its buffer with the END_SEQ
marker. Shared by the subscriber's tests and the doctor's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from kvern.upstream.kv_events import KvEventBatch, encode_batch, encode_seq


def bound(ctx: zmq.asyncio.Context, kind: int, port: int) -> zmq.asyncio.Socket:
    """A socket bound to ``port``, retried while a just-closed one still holds it.

    ZeroMQ closes sockets on its I/O thread, so a restarted publisher binding
    the port its predecessor just closed can find it still taken for a moment.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + 5
    while True:
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
            return sock
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                sock.close(linger=0)
                raise
            time.sleep(0.02)


class ScriptedPublisher:
    """vLLM's ZmqEventPublisher in miniature: PUB (an XPUB here) + a ROUTER replaying a buffer."""

    def __init__(self, ctx: zmq.asyncio.Context, port: int, replay_port: int | None) -> None:
        self.pub = bound(ctx, zmq.XPUB, port)
        self.buffer: list[tuple[int, bytes]] = []
        self.router: zmq.asyncio.Socket | None = None
        self.task: asyncio.Task[None] | None = None
        if replay_port is not None:
            self.router = bound(ctx, zmq.ROUTER, replay_port)
            self.task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def subscribed(self) -> None:
        frame = await asyncio.wait_for(self.pub.recv(), 10)
        assert frame[:1] == b"\x01"

    async def publish(self, item: KvEventBatch, *, drop: bool = False) -> None:
        payload = encode_batch(item)
        self.buffer.append((item.seq, payload))
        if not drop:
            await self.pub.send_multipart([b"", encode_seq(item.seq), payload])

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            client, _, start = await self.router.recv_multipart()
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart([client, b"", b"", encode_seq(seq), payload])
            await self.router.send_multipart([client, b"", b"", encode_seq(-1), b""])

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
