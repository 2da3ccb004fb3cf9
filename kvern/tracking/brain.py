"""The brain: tokenizers, tries, cache models, presence and parity, behind one message stream.

Why a process of its own: tokenizing holds the GIL. On a thread beside the
relay's event loop, a long tokenizer call (a 4 MB prompt, a 1 MB answer
re-tokenized) froze every other user's stream for as long as it ran, and the
step-aside that protected time to first token capped tracking at ~10 req/s
under real prefill times. In its own process, tracking never competes with
the relay; the relay keeps only I/O, load counters, health and the routing
decision, and talks to the brain through :mod:`kvern.tracking.channel`.

The brain runs an asyncio loop (tokenizer loads, parity checks, recording)
and the tracking thread of :class:`~kvern.tracking.tracker.Tracker`. Each
message from the relay is handled on the loop in arrival order; see
:mod:`kvern.tracking.messages` for the conversation. Run as
``python -m kvern.tracking.brain --in-fd R --out-fd W`` by
:class:`kvern.tracking.client.BrainClient`, or on a thread of the relay's own
process (``tracking.isolation: thread``, and tests that inject objects).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kvern.config import CacheModelConfig, KvernConfig
from kvern.parity.checker import ParityChecker, ParityReport
from kvern.routing.book import PresenceBook
from kvern.routing.pool import UpstreamPool
from kvern.routing.shared_state import link_families
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tokenize.without_torch import hide_torch
from kvern.tracking import messages as m
from kvern.tracking.capacity import CapacityCurves
from kvern.tracking.channel import Inbox, Outbox, fd_connection
from kvern.tracking.forest import TrieForest
from kvern.tracking.kv_feed import KvFeed
from kvern.tracking.metrics import BrainMetrics
from kvern.tracking.shared_presence import SharedPresence
from kvern.tracking.site_advice import SiteAdvisor
from kvern.tracking.tracker import Tracker
from kvern.tracking.tree_view import busiest_model, tree_of
from kvern.tracking.views import health_view, visualize
from kvern.upstream.client import build_client

logger = logging.getLogger(__name__)

Send = Callable[..., bool]


class Brain:
    """Everything that reads prompts as tokens, driven by the relay's messages (loop thread)."""

    def __init__(
        self,
        config: KvernConfig,
        send: Send,
        *,
        registry: TokenizerRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``send(header, blob=None, force=False)`` queues a message to the relay."""
        self._send = send
        self._config = config
        pool = UpstreamPool(config.upstream_entries(), config.routing.health)
        several = len(pool) > 1
        # Per upstream: when its oldest request still prefilling was routed, as
        # the relay last said. Marks younger than that are not proof of presence.
        self._oldest_awaiting_s: dict[str, float] = {}
        presence = (
            PresenceBook(
                pool.caches(),
                learn=config.routing.learn_capacity,
                trusted_before=lambda name: self._oldest_awaiting_s.get(name, float("inf")),
            )
            if several
            else None
        )
        # Other kvern instances' routing to the same upstreams (routing.shared_state).
        self.shared = SharedPresence.attach(config.routing, presence)
        self.kv_feed = KvFeed.attach([r.entry for r in pool.replicas], presence, clock)
        held_together = sum(r.entry.kv_capacity_tokens for r in pool.replicas) if several else 0
        self.forest = TrieForest(
            config.trie,
            config.eviction,
            config.upstream.cache_model,
            min_max_tokens=held_together + held_together // 4,
        )
        upstream = pool.replicas[0].upstream
        self.registry = registry or TokenizerRegistry(
            config.tokenizers, upstream_origin=upstream.origin
        )
        self.tracker = Tracker(
            config,
            registry=self.registry,
            forest=self.forest,
            record=lambda record: self._send(m.Record(record), force=True),
            clock=clock,
            max_pending=config.tracking.max_pending,
            presence=presence,
            shared_feed=self.shared,
        )
        self.advisor = SiteAdvisor(
            self.tracker.divergence.samples, self.forest, 4 * config.diagnosis.max_sites
        )
        self.metrics = BrainMetrics()
        self.tracker.on_phase = self.metrics.observe
        self.capacity: CapacityCurves | None = None
        if config.tracking.capacity_curve_max_blocks:
            self.capacity = CapacityCurves(
                lambda model: self.forest.get(model).block_size,
                max_blocks=config.tracking.capacity_curve_max_blocks,
                kv_bytes_per_token=config.tracking.capacity_curve_kv_bytes_per_token,
            )
            self.tracker.on_prompt = self.capacity.observe
        self._client = build_client(config.upstream, None)
        self.parity: ParityChecker | None = None
        if config.tokenizers.parity_check:
            # Rendering runs on the tracking thread, which owns the tokenizers' caches.
            self.parity = ParityChecker(
                client=self._client,
                upstream=upstream,
                run_sync=self.tracker.in_thread,
                clock=clock,
                on_report=self._parity_report,
            )
            self.registry.on_loaded = self.parity.on_loaded
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """On the brain's loop: begin the start-up parity checks and the shared state's threads."""
        if self.shared is not None:
            self.shared.start()
        self.kv_feed.start()
        if self.parity is not None:
            self.parity.start(self.registry, self._config.tokenizers.models)

    def _parity_report(self, report: ParityReport, final: bool) -> None:
        self._send(m.Parity(report, final), force=True)
        if not final:
            logger.info("parity %s; retrying", report.describe())

    # -- messages ----------------------------------------------------------------

    def handle(self, header: Any, blob: bytes | None) -> None:
        """One message from the relay, on the loop, in arrival order; never raises."""
        try:
            self._handle(header, blob or b"")
        except Exception:  # noqa: BLE001 - one bad message must not stop the brain
            logger.exception("brain: handling %s failed", type(header).__name__)

    def _handle(self, header: Any, blob: bytes) -> None:
        tracker = self.tracker
        if isinstance(header, m.Ask):
            asked = tracker.ask(header.ctx, blob)
            rid = header.ctx.request_id
            if asked is None:
                self._send(m.Answer(rid, None), force=True)
            else:
                # Sent from the tracking thread as soon as the answer exists.
                asked.add_done_callback(lambda f: self._send(m.Answer(rid, f.result()), force=True))
        elif isinstance(header, m.Commit):
            self._oldest_awaiting_s.update(header.oldest_awaiting_s)
            tracker.commit(header.ctx, header.upstream)
        elif isinstance(header, m.Begin):
            self._oldest_awaiting_s.update(header.oldest_awaiting_s)
            tracker.begin(header.ctx, blob, insert=header.insert)
        elif isinstance(header, m.Complete):
            ctype = header.content_type
            tracker.complete(header.ctx, header.outcome, body=blob, content_type=ctype)
        elif isinstance(header, m.Drop):
            if tracker.presence is not None:
                tracker.in_thread_soon(tracker.presence.drop_upstream, header.upstream)
            if self.shared is not None:
                self.shared.drop_upstream(header.upstream)
        elif isinstance(header, m.Call) and header.method == "set_normalization":
            # Queued here, in arrival order: requests handed over before it keep
            # the old rules, every later one gets the new (config.yaml reloaded).
            (rules,) = header.args
            self._config = self._config.model_copy(update={"normalization": rules})
            swapped = asyncio.wrap_future(tracker.set_normalization(rules))
            self._spawn(self._reply(header, swapped))
        elif isinstance(header, m.Call):
            self._spawn(self._reply(header))
        else:
            logger.warning("brain: unknown message %s", type(header).__name__)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, call: m.Call, queued: Awaitable[Any] | None = None) -> None:
        try:
            value = await (queued if queued is not None else self._call(call.method, *call.args))
        except Exception as exc:  # noqa: BLE001 - the caller gets the error's text
            self._send(m.Reply(call.call_id, False, f"{type(exc).__name__}: {exc}"), force=True)
        else:
            self._send(m.Reply(call.call_id, True, value), force=True)

    async def _call(self, method: str, *args: Any) -> Any:
        tracker = self.tracker
        if method == "ping":
            return os.getpid()
        if method == "drain":
            # Bounded, and the answer says what is left: a tokenizer load (a
            # hub that never answers) must not hold an admin endpoint.
            (wait_s,) = args or (self._config.tracking.drain_timeout_s,)
            drained = await tracker.drain_within(wait_s)
            return {"drained": drained, "waiting": tracker.waiting_for_tokenizer()}
        if method == "health":
            presence = tracker.presence
            stats = (
                await tracker.in_thread(presence.stats, urgent=True) if presence is not None else {}
            )
            hub = self.registry.hub
            view = health_view(
                self.registry.states(),
                tracker.stats,
                tracker.backlog,
                stats,
                hub=hub.status().to_dict() if hub is not None else None,
            )
            view["shared_state"] = self.shared.view() if self.shared is not None else None
            view["kv_events"] = self.kv_feed.view()
            return view
        if method == "visualize":
            # The relay drained first (bounded); nothing here waits on tracking.
            return await visualize(tracker, self.forest, self.registry, *args)
        if method == "metrics":
            # Read on the tracking thread, where the tries change; ahead of a backlog.
            families = await tracker.in_thread(
                self.metrics.families,
                self.forest,
                tracker.stats,
                tracker.backlog,
                self.registry.states(),
                urgent=True,
            )
            if self.shared is not None:
                families.extend(link_families({"presence": self.shared.view()}))
            families.extend(self.kv_feed.families())
            return families
        if method == "capacity_curve":
            # The live miss-ratio curve per model, read where it is fed; ahead of a backlog.
            (model,) = args or (None,)
            if self.capacity is None:
                return {"models": {}}
            return await tracker.in_thread(self.capacity.view, model, urgent=True)
        if method == "tree":
            # The dashboard's prefix tree; like "visualize", the relay drained first.
            model, max_nodes, min_hits = args
            names = await tracker.in_thread(self.forest.models, urgent=True)
            waiting = tracker.waiting_for_tokenizer()
            if model is None:
                model = await tracker.in_thread(busiest_model, self.forest, urgent=True)
            elif model not in names:
                return {"unknown": names, "waiting": waiting}
            tree = None
            if model is not None:
                tok = self.registry.loaded(model)
                mt = self.forest.get(model)
                tree = await tracker.in_thread(tree_of, mt, tok, max_nodes, min_hits, urgent=True)
            return {"models": names, "tree": tree, "waiting": waiting}
        if method == "advise_sites":
            # /analytics' divergence sites: rules replayed over the prompts kept here.
            (asked,) = args
            tokenizers = {model: self.registry.loaded(model) for model, *_ in asked}
            return await tracker.in_thread(self.advisor.advise, asked, tokenizers, urgent=True)
        if method == "reset_cache_model":
            # The upstream came back with other cache settings (auto detection).
            (settings,) = args
            fresh = CacheModelConfig.model_validate(settings)
            await tracker.in_thread(self.forest.reset_cache_model, fresh, urgent=True)
            return None
        if method == "parity_wait":
            if self.parity is not None:
                await self.parity.wait()
            return None
        raise ValueError(f"unknown call {method!r}")

    async def close(self) -> None:
        """Finish every queued job (their rows go out), then stop."""
        if self.parity is not None:
            await self.parity.close()
        await self.tracker.close()
        await self.kv_feed.close()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.shared is not None:
            await asyncio.to_thread(self.shared.close)
        await self._client.aclose()


async def serve(
    config: KvernConfig,
    outbox: Outbox,
    receive: Callable[[Callable[[Any, bytes | None], None], Callable[[], None]], Any],
    *,
    registry: TokenizerRegistry | None = None,
    clock: Callable[[], float] = time.time,
    freeze_long_lived: bool = False,
) -> None:
    """Run one brain until the relay says Shutdown or goes away.

    ``freeze_long_lived`` (a process of its own only): after start-up and after
    each tokenizer load, what exists is moved out of the garbage collector's
    sight, so full collections stay short and routing answers prompt.

    ``receive(deliver, on_closed)`` starts reading the relay's messages; it
    calls ``deliver`` from its own thread.
    """
    loop = asyncio.get_running_loop()
    brain = Brain(config, outbox.put, registry=registry, clock=clock)
    stop = asyncio.Event()

    def soon(fn: Callable[..., Any], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the brain already stopped: nothing is waiting
            pass

    def deliver(header: Any, blob: bytes | None) -> None:
        if isinstance(header, m.Shutdown):
            soon(stop.set)
        else:
            soon(brain.handle, header, blob)

    def closed() -> None:
        soon(stop.set)

    receive(deliver, closed)
    if freeze_long_lived:
        brain.registry.after_load = _freeze
        _freeze()
    brain.start()
    outbox.put(m.Hello(os.getpid()), force=True)
    await stop.wait()
    await brain.close()
    outbox.put(m.Bye(), force=True)


def _freeze() -> None:
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """The brain process: read the Start message, then serve until told to stop."""
    parser = argparse.ArgumentParser(description="kvern's tracking process (started by kvern)")
    parser.add_argument("--in-fd", type=int, required=True)
    parser.add_argument("--out-fd", type=int, required=True)
    args = parser.parse_args(argv)
    hide_torch()  # the brain tokenizes and never runs a model
    # The relay decides when the brain stops (Shutdown, or closing the pipe):
    # a signal to the whole process group must not cut rows short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the relay's: reload config.yaml
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s kvern-brain %(name)s: %(message)s"
    )
    incoming = fd_connection(args.in_fd, readable=True)
    outgoing = fd_connection(args.out_fd, readable=False)
    first = incoming.recv_bytes()
    start = pickle.loads(first[1:])
    if not isinstance(start, m.Start):
        print("kvern brain: expected a Start message", file=sys.stderr)
        return 2
    outbox = Outbox(outgoing, max_messages=1 << 30, name="kvern-brain-out")

    def receive(deliver: Callable[[Any, bytes | None], None], closed: Callable[[], None]) -> Inbox:
        return Inbox(incoming, deliver, on_closed=closed, name="kvern-brain-in")

    asyncio.run(serve(start.config, outbox, receive, freeze_long_lived=True))
    outbox.close(timeout_s=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
