"""The relay's side of the brain: hand requests over, ask routing questions, read views.

Why every call on the request path returns at once: the relay forwards
bytes; the brain may be busy, slow, dead or restarting. Each request-path
call only queues a message (bounded; a full queue means the request passes
untracked and counted), routing questions come back as futures the router
waits on with its own deadline, and rows the brain never sent back are
written here, without tracking figures, so every request keeps its row.

The brain is supervised: a brain whose pipe closes (it died) or that misses a
ping for ``tracking.hang_timeout_s`` (it hangs; it is killed) is restarted
with a growing back-off, and ``/health`` shows its state and restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import subprocess
import time
from collections.abc import Callable
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.config import KvernConfig, NormalizationRule
from kvern.routing.prefix_answer import PrefixAnswer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking import messages as m
from kvern.tracking.link import BrainLink, open_process, open_thread
from kvern.tracking.pending import PendingRows
from kvern.tracking.records import Outcome, RequestContext
from kvern.tracking.relay_view import BrainStats, BrainUnavailable, DrainState

logger = logging.getLogger(__name__)

_RESTART_BACKOFF_S = (0.2, 1.0, 2.0, 5.0, 10.0)
_PING_EVERY_S = 1.0
_BYE_TIMEOUT_S = 60.0
# A bounded drain: the brain replies this much before the relay stops waiting.
_DRAIN_REPLY_MARGIN_S = 0.2


class BrainClient:
    """Talks to one brain at a time on the relay's event loop, restarting it when it fails."""

    def __init__(
        self,
        config: KvernConfig,
        *,
        record: Callable[[RequestRecord], Any] | None,
        on_parity: Callable[[Any, bool], None] | None = None,
        registry: TokenizerRegistry | None = None,
        clock: Callable[[], float] = time.time,
        isolation: str | None = None,
    ) -> None:
        """``registry`` or a ``clock`` other than ``time.time`` need ``isolation: thread``."""
        self._config = config
        self._record = record
        self._on_parity = on_parity
        self._registry = registry
        self._clock = clock
        chosen = isolation or config.tracking.isolation
        if registry is not None or clock is not time.time:
            chosen = "thread"  # objects of this process cannot cross into another
        self.stats = BrainStats(isolation=chosen)
        self._generation = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._link: BrainLink | None = None
        self.pending = PendingRows(record)  # handed over, row not back yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._exits: set[asyncio.Future[None]] = set()  # dead brains being reaped

    @property
    def queued(self) -> int:
        """Messages waiting to be written to the brain."""
        link = self._link
        return link.outbox.depth if link is not None else 0

    def set_parity_sink(self, on_parity: Callable[[Any, bool], None]) -> None:
        """Where the brain's parity reports go (set before :meth:`start`)."""
        self._on_parity = on_parity

    # -- life cycle --------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start the first brain and its supervisor, and wait (bounded) until it is ready.

        Requests handed over before it is ready wait in the queue; the wait
        only keeps the first requests' routing questions from timing out.
        """
        self._loop = asyncio.get_running_loop()
        self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="kvern-brain-supervisor")
        if not await self.wait_ready(ready_timeout_s):
            logger.error("kvern's tracking process is not ready after %.0f s", ready_timeout_s)

    def _open(self) -> None:
        generation = next(self._generation)
        self.stats.state = "starting"
        deliver, closed = self._deliver_from(generation), self._closed_from(generation)
        max_pending = self._config.tracking.max_pending
        if self.stats.isolation == "thread":
            link = open_thread(
                generation, self._config, deliver, closed, max_pending, self._registry, self._clock
            )
        else:
            link = open_process(generation, self._config, deliver, closed, max_pending)
        self.stats.pid = link.pid
        self._link = link

    def _deliver_from(self, generation: int) -> Callable[[Any, bytes | None], None]:
        def deliver(header: Any, blob: bytes | None) -> None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._on_message, generation, header)
                except RuntimeError:  # the loop closed meanwhile: nothing waits any more
                    pass

        return deliver

    def _closed_from(self, generation: int) -> Callable[[], None]:
        def closed() -> None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._on_lost, generation, "its pipe closed")
                except RuntimeError:
                    pass

        return closed

    async def _supervise(self) -> None:
        """Ping the brain; kill one that hangs; start a new one after one is lost."""
        backoff = iter(_RESTART_BACKOFF_S)
        while not self._closing:
            link = self._link
            if link is None or self.stats.state == "down":
                delay = next(backoff, _RESTART_BACKOFF_S[-1])
                await asyncio.sleep(delay)
                if self._closing:
                    return
                self.stats.restarts += 1
                logger.warning(
                    "restarting kvern's tracking process (restart %d)", self.stats.restarts
                )
                self._open()
                continue
            try:
                await self.call("ping", timeout_s=self._config.tracking.hang_timeout_s)
            except BrainUnavailable as exc:
                if self._closing or link is not self._link or self.stats.state != "up":
                    await asyncio.sleep(_PING_EVERY_S)
                    continue
                logger.error("kvern's tracking process does not answer (%s); killing it", exc)
                link.kill()
                self._on_lost(link.generation, f"it did not answer a ping: {exc}")
                continue
            backoff = iter(_RESTART_BACKOFF_S)  # a healthy brain resets the back-off
            await asyncio.sleep(_PING_EVERY_S)

    def _on_lost(self, generation: int, why: str) -> None:
        """On the loop: a brain went away; every request it held is written here."""
        link = self._link
        if link is None or link.generation != generation:
            return
        self._link = None
        if not self._closing:
            logger.error("kvern's tracking process went away: %s; requests pass untracked", why)
        self.stats.state = "stopped" if self._closing else "down"
        self.stats.last_exit = why
        self.stats.pid = None
        link.bye.set()
        link.hello.set()
        for fut in list(link.asks.values()):
            if not fut.done():
                fut.set_result(None)
        for call in list(link.calls.values()):
            if not call.done():
                call.set_exception(BrainUnavailable(f"tracking process went away: {why}"))
        self.pending.brain_lost()
        link.kill()
        link.outbox.close(timeout_s=0)
        if link.process is not None:
            reaping = asyncio.ensure_future(self._note_exit(link.process, why))
            self._exits.add(reaping)
            reaping.add_done_callback(self._exits.discard)

    async def _note_exit(self, process: subprocess.Popen[bytes], why: str) -> None:
        """Add the dead brain's exit code to ``last_exit`` once it is reaped."""
        try:
            code = await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            return
        if self.stats.last_exit == why:
            self.stats.last_exit = f"{why} (exit code {code})"

    def _on_message(self, generation: int, header: Any) -> None:
        link = self._link
        if link is None or link.generation != generation:
            return
        if isinstance(header, m.Record):
            self.pending.returned(header.record.request_id)
            if self._record is not None:
                self._record(header.record)
        elif isinstance(header, m.Answer):
            fut = link.asks.pop(header.request_id, None)
            if fut is None or fut.done():
                self.stats.late_answers += 1
            else:
                fut.set_result(header.answer)
        elif isinstance(header, m.Reply):
            call = link.calls.pop(header.call_id, None)
            if call is not None and not call.done():
                if header.ok:
                    call.set_result(header.value)
                else:
                    call.set_exception(BrainUnavailable(f"tracking process: {header.value}"))
        elif isinstance(header, m.Parity):
            if self._on_parity is not None:
                self._on_parity(header.report, header.final)
        elif isinstance(header, m.Hello):
            self.stats.state = "up"
            link.hello.set()
        elif isinstance(header, m.Bye):
            link.bye.set()

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until the current brain said Hello (tests, tools)."""
        link = self._link
        if link is None:
            return False
        try:
            await asyncio.wait_for(link.hello.wait(), timeout_s)
        except TimeoutError:
            return False
        return self.stats.state == "up"

    async def close(self) -> None:
        """Let the brain finish what it holds (every row comes back), then stop it."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        link = self._link
        if link is not None:
            link.outbox.put(m.Shutdown(), force=True)
            try:
                await asyncio.wait_for(link.bye.wait(), _BYE_TIMEOUT_S)
            except TimeoutError:
                logger.error("kvern's tracking process did not finish in %.0f s", _BYE_TIMEOUT_S)
            link.outbox.close(timeout_s=5)
            if link.process is not None:
                try:
                    await asyncio.to_thread(link.process.wait, 10)
                except subprocess.TimeoutExpired:
                    link.process.kill()
            if link.thread is not None:
                await asyncio.to_thread(link.thread.join, 10)
            self._on_lost(link.generation, "kvern stopped")
        await asyncio.gather(*list(self._exits), return_exceptions=True)
        self.stats.state = "stopped"

    # -- the request path (never blocks, never raises) -----------------------------

    def _up(self) -> BrainLink | None:
        """The brain to hand work to: up, or starting (its messages wait in the queue)."""
        link = self._link
        return link if link is not None and self.stats.state in ("up", "starting") else None

    def ask(self, ctx: RequestContext, body: bytes) -> asyncio.Future[PrefixAnswer | None] | None:
        """Ask where ``ctx``'s prefix is held; None when the brain cannot be asked now."""
        link = self._up()
        if link is None or not link.outbox.put(m.Ask(ctx), body):
            return None
        assert self._loop is not None
        fut: asyncio.Future[PrefixAnswer | None] = self._loop.create_future()
        link.asks[ctx.request_id] = fut
        ctx.asked = True
        self.pending.handed(ctx)
        return fut

    def commit(
        self, ctx: RequestContext, upstream: str | None, oldest_awaiting_s: dict[str, float]
    ) -> None:
        """Tell the brain where an asked request went (None: nowhere)."""
        link = self._link
        if link is None or not ctx.asked:
            return
        fut = link.asks.pop(ctx.request_id, None)
        if fut is not None and not fut.done():
            fut.cancel()  # its answer, when it comes, is a late one
        link.outbox.put(m.Commit(ctx, upstream, oldest_awaiting_s), force=True)

    def begin(
        self, ctx: RequestContext, body: bytes, *, insert: bool, oldest_awaiting_s: dict[str, float]
    ) -> None:
        """The first byte (or the end, if none came): track the prompt."""
        link = self._up()
        if link is None:
            if not ctx.asked:
                self.stats.skipped_down += 1
            return
        if not link.outbox.put(m.Begin(ctx, insert, oldest_awaiting_s), body):
            if not ctx.asked:
                self.stats.skipped_backlog += 1
            return
        self.pending.handed(ctx)

    def complete(
        self, ctx: RequestContext, outcome: Outcome, *, body: bytes, content_type: str
    ) -> None:
        """The answer is over: the brain settles it and sends its row, or the row is made here."""
        link = self._link
        header = m.Complete(ctx, outcome, content_type)
        # A request the brain holds must be completed there (its trie node is
        # locked until then): that message is never dropped. Others may be.
        held = self.pending.holds(ctx.request_id)
        if link is not None and link.outbox.put(header, body, force=held):
            self.pending.completed(ctx, outcome)
        else:
            self.pending.write_untracked(ctx, outcome)

    def record_plain(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The row of a forwarded request with no prompt to track, written here at once."""
        self.pending.write_plain(ctx, outcome)

    async def set_normalization(self, rules: dict[str, list[NormalizationRule]]) -> None:
        """New normalization rules for every request handed over from now on (config reloaded).

        Brains started later (after a crash or a hang) start with them too.
        A brain that cannot be told now is left to the supervisor: one that
        is down is restarted with these rules, one that hangs is killed.
        """
        self._config = self._config.model_copy(update={"normalization": rules})
        try:
            await self.call("set_normalization", rules)
        except BrainUnavailable as exc:
            logger.warning("new normalization rules wait for the next tracking process: %s", exc)

    def drop_upstream(self, name: str) -> None:
        link = self._link
        if link is not None:
            link.outbox.put(m.Drop(name), force=True)

    # -- reads -----------------------------------------------------------------------

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """A read from the brain; raises :class:`BrainUnavailable` when it cannot answer in time."""
        link = self._up()
        if link is None:
            raise BrainUnavailable(f"tracking process is {self.stats.state}")
        assert self._loop is not None
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        link.calls[call_id] = fut
        link.outbox.put(m.Call(call_id, method, args), force=True)
        limit = self._config.tracking.hang_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(fut), limit)
        except TimeoutError:
            raise BrainUnavailable(f"no answer to {method!r} in {limit:g} s") from None
        finally:
            link.calls.pop(call_id, None)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until what was handed over so far has its rows back (False: not in time)."""
        return (await self.drain_state(timeout_s)).drained

    async def drain_state(self, timeout_s: float | None = None) -> DrainState:
        """Wait at most ``timeout_s`` (default ``tracking.drain_timeout_s``) for rows owed so far.

        Why bounded on both sides: an admin endpoint must answer whatever the
        brain is doing (a tokenizer load that waits on a hub, a long backlog, a
        hang). The brain stops waiting a little before the relay does and says
        what is left; a brain that says nothing in time is reported as such.
        """
        limit = self._config.tracking.drain_timeout_s if timeout_s is None else timeout_s
        brain_wait_s = max(0.0, limit - _DRAIN_REPLY_MARGIN_S)
        try:
            reply = await self.call(
                "drain", brain_wait_s, timeout_s=max(limit, _DRAIN_REPLY_MARGIN_S)
            )
        except BrainUnavailable as exc:
            return DrainState(False, self.pending.num_owed, {}, str(exc))
        # Rows the brain sent before its reply were delivered before it, in order.
        return DrainState(bool(reply["drained"]), self.pending.num_owed, dict(reply["waiting"]))
