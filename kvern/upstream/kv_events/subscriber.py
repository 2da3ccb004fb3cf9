"""Follow one upstream's KV event stream on the event loop, in order, without holes.

Why a subscriber of its own: the stream is only worth trusting when kvern has
applied every batch in sequence. ZeroMQ's PUB drops messages when a
subscriber is slow or not yet connected (the "slow joiner"), so each batch's
8-byte sequence number is checked:

    seq == last + 1          apply it
    seq <= last (replayed)   a batch the replay already gave: skip it
    seq >  last + 1          a gap: ask the replay ROUTER for last + 1 onwards, apply
                             what it has in order; what it cannot give is reported
                             (``on_gap`` and ``stats.gaps``): presence may now be wrong
    seq <= last seen live    the publisher started over (a restarted engine numbers from
                             0 again): ``on_reset``, then the batch is taken as the first
    after a disconnect       the connection to the publisher dropped (ZeroMQ's monitor
                             says so): ``on_disconnect`` at once, since the engine may be
                             gone; the next batch tells which: last + 1 is the same
                             publisher going on, any other number one that started over

Live batches from one publisher only ever rise, so a live number at or below
the last live one is a restart, never a duplicate; duplicates come only from
overlap with a replay. Joining late is a gap from 0 like any other: the replay
buffer (vLLM keeps ``buffer_steps`` = 10,000 batches) usually still has the
start.

Callbacks are synchronous and run on the loop (the presence index is pure);
one that raises is logged and counted, never let out. Nothing here raises into
the caller: a bad frame is counted and skipped, a dead replay endpoint is a
reported gap. Bounded: the SUB queue by its high-water mark, a replay by
``max_replay_batches`` and ``replay_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvern.upstream.kv_events.wire import (
    END_SEQ,
    KvEventBatch,
    KvEventDecodeError,
    decode_batch,
    decode_seq,
    encode_seq,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SubscriberStats:
    """What the subscriber saw, for metrics and tests."""

    batches: int = 0  # applied (live or replayed)
    events: int = 0  # inside the applied batches
    duplicates: int = 0  # live batches a replay had already applied
    gaps: int = 0  # holes the replay could not fill (each reported once)
    missed_batches: int = 0  # batches inside those holes
    replays: int = 0  # replay requests made
    replayed_batches: int = 0  # batches applied from replays
    replay_failures: int = 0  # replays that timed out or broke off
    resets: int = 0  # publisher restarts seen
    disconnects: int = 0  # connections to the publisher that dropped
    decode_errors: int = 0
    callback_errors: int = 0


class KvEventSubscriber:
    """A SUB socket on one upstream's ``endpoint`` (and a DEALER for replays), fed to callbacks.

    ``on_batch`` gets each batch in sequence order; ``on_reset`` is called
    when the publisher restarted (before its first batch); ``on_gap(first,
    last)`` names sequence numbers that were lost for good; ``on_replay(n)``
    says a replay applied ``n`` batches of a hole; ``on_disconnect`` that the
    connection to the publisher dropped (what it held may be gone with it).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        on_batch: Callable[[KvEventBatch], None],
        on_reset: Callable[[], None] | None = None,
        on_gap: Callable[[int, int], None] | None = None,
        on_replay: Callable[[int], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        replay_endpoint: str | None = None,
        topic: str = "",
        replay_timeout_s: float = 2.0,
        max_replay_batches: int = 10_000,
        hwm: int = 100_000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.stats = SubscriberStats()
        self._on_batch = on_batch
        self._on_reset = on_reset
        self._on_gap = on_gap
        self._on_replay = on_replay
        self._on_disconnect = on_disconnect
        self._replay_timeout_s = replay_timeout_s
        self._max_replay_batches = max_replay_batches
        self._hwm = hwm
        self._owns_context = context is None
        self._context = context or zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_applied = -1  # the last sequence number applied; -1 before any
        self._last_live: int | None = None  # the last one received live
        self._after_disconnect = False  # the next batch decides: same publisher or a new one
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The sequence number of the last batch applied (-1 before the first)."""
        return self._last_applied

    def start(self) -> None:
        """Connect and start following on the running loop (connecting never blocks)."""
        if self._task is not None or self._closed:
            return
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self._hwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode("utf-8"))
        self._monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sub.connect(self.endpoint)
        self._sub = sub
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kv-events")

    async def close(self) -> None:
        """Stop following and close the sockets (and the context if it is ours)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        if self._owns_context:
            self._context.term()

    async def _run(self) -> None:
        """Read batches and the monitor's events in the order they happened.

        One loop for both: batches the dead publisher sent before it went are
        already queued when the disconnect is reported, so the queue is
        drained first and they are taken as the old publisher's.
        """
        assert self._sub is not None and self._monitor is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            await self._drain()
            if self._monitor in ready:
                await self._watch()

    async def _drain(self) -> None:
        assert self._sub is not None
        while True:
            try:
                frames = await self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 3:
                    raise KvEventDecodeError(f"message: {len(frames)} frames, not 3")
                await self._receive(decode_seq(frames[1]), frames[2])
            except asyncio.CancelledError:
                raise
            except KvEventDecodeError as exc:
                self.stats.decode_errors += 1
                logger.warning("kv events from %s: %s", self.endpoint, exc)
            except Exception:  # never let the follower die: log and go on
                self.stats.decode_errors += 1
                logger.exception("kv events from %s: unexpected error", self.endpoint)

    async def _watch(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.stats.disconnects += 1
                self._after_disconnect = True
                logger.warning("kv events from %s: publisher disconnected", self.endpoint)
                self._call(self._on_disconnect)

    async def _receive(self, seq: int, payload: bytes) -> None:
        if self._after_disconnect:
            self._after_disconnect = False
            if seq != self._last_applied + 1:
                self._reset()  # not the sequence going on: a publisher that started over
        elif self._last_live is not None and seq <= self._last_live:
            self._reset()
        self._last_live = seq
        if seq <= self._last_applied:
            self.stats.duplicates += 1
            return
        if seq > self._last_applied + 1:
            before = self.stats.replayed_batches
            await self._replay(self._last_applied + 1)
            recovered = self.stats.replayed_batches - before
            if recovered and self._on_replay is not None:
                on_replay = self._on_replay
                self._call(lambda: on_replay(recovered))
            if seq <= self._last_applied:
                self.stats.duplicates += 1
                return
            if seq > self._last_applied + 1:
                self._gap(self._last_applied + 1, seq - 1)
        self._apply(decode_batch(seq, payload))

    def _reset(self) -> None:
        self.stats.resets += 1
        self._last_applied = -1
        self._call(self._on_reset)

    def _gap(self, first: int, last: int) -> None:
        self.stats.gaps += 1
        self.stats.missed_batches += last - first + 1
        logger.warning("kv events from %s: batches %d..%d lost", self.endpoint, first, last)
        if self._on_gap is not None:
            on_gap = self._on_gap
            self._call(lambda: on_gap(first, last))
        self._last_applied = last

    def _apply(self, batch: KvEventBatch, *, replayed: bool = False) -> None:
        self._last_applied = batch.seq
        self.stats.batches += 1
        self.stats.events += len(batch.events)
        if replayed:
            self.stats.replayed_batches += 1
        self._call(lambda: self._on_batch(batch))

    def _call(self, callback: Callable[[], object] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            self.stats.callback_errors += 1
            logger.exception("kv events from %s: a callback raised", self.endpoint)

    async def _replay(self, start: int) -> None:
        """Ask the ROUTER for batches from ``start`` on and apply those that follow in order.

        A fresh DEALER per request, so a late answer to an earlier one that
        timed out can never be taken for this one's.
        """
        if self.replay_endpoint is None:
            return
        self.stats.replays += 1
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._replay_timeout_s
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", encode_seq(start)])
            for _ in range(self._max_replay_batches + 1):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                frames = await asyncio.wait_for(dealer.recv_multipart(), remaining)
                if len(frames) != 4:
                    raise KvEventDecodeError(f"replay: {len(frames)} frames, not 4")
                seq = decode_seq(frames[2])
                if seq == END_SEQ:
                    return
                if seq <= self._last_applied:
                    continue
                if seq > self._last_applied + 1:
                    return  # the buffer no longer reaches back: the rest is a gap
                self._apply(decode_batch(seq, frames[3]), replayed=True)
            logger.warning(
                "kv events from %s: replay cut at %d batches",
                self.endpoint,
                self._max_replay_batches,
            )
        except (TimeoutError, asyncio.TimeoutError, KvEventDecodeError, zmq.ZMQError) as exc:
            self.stats.replay_failures += 1
            logger.warning(
                "kv events from %s: replay from %d failed: %r", self.replay_endpoint, start, exc
            )
        finally:
            dealer.close(linger=0)
