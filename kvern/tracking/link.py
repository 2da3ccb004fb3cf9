"""Start one brain and the two ends of its channel: a child process, or a thread of this one.

Why apart from the client: how a brain is started (pipes inherited by a
``python -m kvern.tracking.brain`` child, or in-process queues and a thread
with its own event loop) is separate from what the relay says to it; the
client sees a :class:`BrainLink` either way.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from kvern.config import KvernConfig
from kvern.routing.prefix_answer import PrefixAnswer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking import messages as m
from kvern.tracking.brain import serve
from kvern.tracking.channel import Inbox, Outbox, QueueConnection

Deliver = Callable[[Any, bytes | None], None]
# How long a thread brain may take to send what it holds once told to stop.
_DRAIN_OUT_S = 60.0


@dataclass(slots=True)
class BrainLink:
    """One running brain, the two ends of its channel, and what waits on its answers."""

    generation: int  # which start of the brain this is (answers of an older one are ignored)
    outbox: Outbox  # to the brain
    inbox: Inbox  # from the brain
    pid: int  # the brain's process (this one, for a thread)
    process: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    calls: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    asks: dict[str, asyncio.Future[PrefixAnswer | None]] = field(default_factory=dict)
    bye: asyncio.Event = field(default_factory=asyncio.Event)
    hello: asyncio.Event = field(default_factory=asyncio.Event)

    def kill(self) -> None:
        """SIGKILL a child brain (a thread cannot be killed; it is left to finish)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def open_process(
    generation: int,
    config: KvernConfig,
    deliver: Deliver,
    closed: Callable[[], None],
    max_pending: int,
) -> BrainLink:
    """A child ``python -m kvern.tracking.brain`` reading and writing inherited pipes."""
    to_brain_r, to_brain_w = os.pipe()
    from_brain_r, from_brain_w = os.pipe()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvern.tracking.brain",
            "--in-fd",
            str(to_brain_r),
            "--out-fd",
            str(from_brain_w),
        ],
        pass_fds=(to_brain_r, from_brain_w),
        stdin=subprocess.DEVNULL,
    )
    os.close(to_brain_r)
    os.close(from_brain_w)
    outbox = Outbox(
        Connection(to_brain_w, readable=False), max_messages=max_pending, name="kvern-to-brain"
    )
    outbox.put(m.Start(config), force=True)
    inbox = Inbox(
        Connection(from_brain_r, writable=False), deliver, on_closed=closed, name="kvern-from-brain"
    )
    return BrainLink(generation, outbox, inbox, process.pid, process=process)


def open_thread(
    generation: int,
    config: KvernConfig,
    deliver: Deliver,
    closed: Callable[[], None],
    max_pending: int,
    registry: TokenizerRegistry | None,
    clock: Callable[[], float] = time.time,
) -> BrainLink:
    """A brain on a thread of this process, over in-process queues (shares this GIL)."""
    to_brain_r, to_brain_w = QueueConnection.pair()
    from_brain_r, from_brain_w = QueueConnection.pair()

    def run() -> None:
        brain_out = Outbox(from_brain_w, max_messages=1 << 30, name="kvern-brain-out")

        def receive(on_message: Deliver, on_closed: Callable[[], None]) -> Inbox:
            return Inbox(to_brain_r, on_message, on_closed=on_closed, name="kvern-brain-in")

        try:
            asyncio.run(serve(config, brain_out, receive, registry=registry, clock=clock))
        finally:
            brain_out.close(timeout_s=_DRAIN_OUT_S)

    thread = threading.Thread(target=run, name="kvern-brain", daemon=True)
    outbox = Outbox(to_brain_w, max_messages=max_pending, name="kvern-to-brain")
    inbox = Inbox(from_brain_r, deliver, on_closed=closed, name="kvern-from-brain")
    thread.start()
    return BrainLink(generation, outbox, inbox, os.getpid(), thread=thread)
