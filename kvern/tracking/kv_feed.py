"""Upstreams' KV events, followed in the brain and answered as exact presence.

Why here: the brain owns presence (:class:`~kvern.routing.book.PresenceBook`)
and runs an asyncio loop, where ZeroMQ subscribers live. Each upstream with
``upstreams[].kv_events`` gets one :class:`~kvern.upstream.kv_events.KvEventSubscriber`
and one :class:`~kvern.routing.event_presence.EventPresence`; this module is
the book's ``exact_sources`` entry for all of them.

Threads: events arrive on the brain's loop and questions come from the
tracking thread (the router's answer, the prediction). Events are applied on
the loop as they arrive, under one lock per upstream that the tracking thread
takes too, rather than queued onto the tracking thread: a queued batch would
wait behind bookkeeping jobs while the routing question of the next request
(an *urgent* job) overtook it, so kvern would answer from a view older than
what it had already received. Both sides hold the lock briefly (one batch's
map updates, one walk over a prompt's blocks), and neither does I/O under it.

When events are not the truth (before the first batch, after a gap the replay
could not fill, after the publisher's connection dropped), ``held_tokens``
answers None and kvern uses its model of that upstream; ``answers.model``
counts those questions and ``fallbacks`` the times it came to that. A
restarted engine (its numbering starts over, or ``AllBlocksCleared``) clears
the presence and makes it exact again.

LoRA: vLLM files a LoRA's blocks under its name, which is also the model name
clients send, so a request's model is looked up as a LoRA once its name has
been seen in a ``BlockStored``, as the base model before that. Salted or
multimodal blocks (vLLM's ``extra_keys``) never match: held 0 from events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvern.config.routing import UpstreamEntry
from kvern.routing.book import PresenceBook
from kvern.routing.event_presence import EventPresence
from kvern.upstream.kv_events import KvEventBatch, KvEventSubscriber
from kvern.upstream.kv_events.endpoints import KvEventsEndpoints, configured, detect

logger = logging.getLogger(__name__)

_DETECT_TIMEOUT_S = 5.0
_DETECT_RETRY_S = 10.0


class _Upstream:
    """One upstream's subscriber, presence and counters; the lock guards the presence."""

    def __init__(self, entry: UpstreamEntry, clock: Callable[[], float]) -> None:
        self.entry = entry
        self.clock = clock
        self.lock = threading.Lock()
        self.presence = EventPresence()
        self.endpoints = configured(entry)
        self.subscriber: KvEventSubscriber | None = None
        self.state = "starting" if self.endpoints is not None else "detecting"
        self.exact_answers = 0  # questions answered from events
        self.model_answers = 0  # questions left to the model (events not exact)
        self.caught_up_s = float("-inf")  # when the latest batch was received (wall clock)
        self._warned_block_size = False

    def locked(self, fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            with self.lock:
                fn(*args)
            self._check_block_size()

        return run

    def follow(self, endpoints: KvEventsEndpoints, context: zmq.asyncio.Context) -> None:
        """Subscribe (on the loop); every callback changes the presence under the lock."""
        presence = self.presence
        self.endpoints = endpoints
        self.subscriber = KvEventSubscriber(
            endpoints.endpoint,
            replay_endpoint=endpoints.replay_endpoint,
            topic=endpoints.topic,
            on_batch=self.locked(self._apply),
            on_reset=self.locked(presence.reset),
            on_gap=self.locked(presence.note_gap),
            on_replay=self.locked(presence.note_replay),
            on_disconnect=self.locked(presence.note_disconnect),
            context=context,
        )
        self.subscriber.start()
        self.state = "following"
        logger.info(
            "upstream %s: presence from its KV events at %s (replay %s)",
            self.entry.name,
            endpoints.endpoint,
            endpoints.replay_endpoint or "none",
        )

    def _apply(self, batch: KvEventBatch) -> None:
        now = self.clock()
        self.presence.apply(batch, now)
        self.caught_up_s = now

    def _check_block_size(self) -> None:
        size = self.presence.block_size
        if self._warned_block_size or size is None or size % self.entry.block_size == 0:
            return
        self._warned_block_size = True
        logger.warning(
            "upstream %s: its KV events say block size %d, upstreams[].block_size is %d: "
            "set it to %d (predictions are aligned to it)",
            self.entry.name,
            size,
            self.entry.block_size,
            size,
        )

    def held_tokens(self, model: str, ids: Sequence[int], as_of_s: float | None) -> int | None:
        with self.lock:
            presence = self.presence
            if not presence.exact:
                self.model_answers += 1
                return None
            lora = model if model in presence.lora_names else None
            held = presence.held_tokens(ids, lora_name=lora, stored_before_s=as_of_s)
            size = presence.block_size
            self.exact_answers += 1
        # The engine never serves a prompt's last token from cache.
        if size:
            held = min(held, (len(ids) - 1) // size * size)
        return max(held, 0)

    def view(self) -> dict[str, Any]:
        sub = self.subscriber.stats if self.subscriber is not None else None
        with self.lock:
            p = self.presence
            out: dict[str, Any] = {
                "state": self.state,
                "endpoint": self.endpoints.endpoint if self.endpoints else None,
                "replay_endpoint": self.endpoints.replay_endpoint if self.endpoints else None,
                "topic": self.endpoints.topic if self.endpoints else None,
                "exact": p.exact,
                "block_size": p.block_size,
                "blocks_held": len(p),
                "blocks_stored": p.stats.stored,
                "blocks_removed": p.stats.removed,
                "unknown_removed": p.stats.unknown_removed,
                "cleared": p.stats.cleared,
                "ignored": p.stats.ignored,
                "fallbacks": p.stats.fallbacks,
                "answers": {"events": self.exact_answers, "model": self.model_answers},
            }
        out.update(
            {
                "batches": sub.batches if sub else 0,
                "events_applied": sub.events if sub else 0,
                "gaps": sub.gaps if sub else 0,
                "missed_batches": sub.missed_batches if sub else 0,
                "replays": sub.replays if sub else 0,
                "replayed_batches": sub.replayed_batches if sub else 0,
                "replay_failures": sub.replay_failures if sub else 0,
                "resets": sub.resets if sub else 0,
                "disconnects": sub.disconnects if sub else 0,
                "decode_errors": sub.decode_errors if sub else 0,
            }
        )
        return out


class KvFeed:
    """The presence book's exact source: every upstream configured with ``kv_events``."""

    def __init__(
        self, entries: Sequence[UpstreamEntry], clock: Callable[[], float] = time.time
    ) -> None:
        """``clock``: the wall clock requests' arrival times are in (``RequestContext.ts_s``)."""
        self._upstreams = {e.name: _Upstream(e, clock) for e in entries if e.kv_events is not None}
        self._context: zmq.asyncio.Context | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def attach(
        cls,
        entries: Sequence[UpstreamEntry],
        book: PresenceBook | None,
        clock: Callable[[], float] = time.time,
    ) -> KvFeed:
        """A feed for ``entries``' events, registered in ``book`` (empty without a book).

        The book exists with two or more upstreams (it is what routing reads);
        with one, kvern's cache model predicts and events are not followed.
        """
        wanted = [e for e in entries if e.kv_events is not None]
        if wanted and book is None:
            logger.warning(
                "upstreams[].kv_events is used with two or more upstreams; with one, "
                "kvern's cache model predicts and the events are not followed"
            )
            wanted = []
        feed = cls(wanted, clock)
        if book is not None:
            for name in feed._upstreams:
                book.exact_sources[name] = feed
        return feed

    def start(self) -> None:
        """On the brain's loop: subscribe to every configured publisher, detect the others."""
        if not self._upstreams:
            return
        self._context = zmq.asyncio.Context()
        for upstream in self._upstreams.values():
            if upstream.endpoints is not None:
                upstream.follow(upstream.endpoints, self._context)
            else:
                task = asyncio.get_running_loop().create_task(self._detect(upstream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _detect(self, upstream: _Upstream) -> None:
        """Ask vLLM where it publishes until it answers for good (it may not be up yet)."""
        async with httpx.AsyncClient() as client:
            while True:
                found = await detect(client, upstream.entry.url, _DETECT_TIMEOUT_S)
                if found.endpoints is not None and self._context is not None:
                    upstream.follow(found.endpoints, self._context)
                    return
                upstream.state = f"detecting: {found.reason}"
                if found.final:
                    upstream.state = f"not followed: {found.reason}"
                    logger.warning(
                        "upstream %s: kv_events auto: %s", upstream.entry.name, found.reason
                    )
                    return
                await asyncio.sleep(_DETECT_RETRY_S)

    async def close(self) -> None:
        """Stop detecting and following; close the sockets."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for upstream in self._upstreams.values():
            if upstream.subscriber is not None:
                await upstream.subscriber.close()
        if self._context is not None:
            self._context.term()
            self._context = None

    # -- the PresenceSource ------------------------------------------------------------

    def held_tokens(
        self, model: str, upstream: str, ids: Sequence[int], as_of_s: float | None = None
    ) -> int | None:
        """Tokens of ``ids`` the engine will report cached; None: not exact now (tracking).

        ``as_of_s``: the request's arrival; blocks received later (its own,
        when the prediction runs after the engine served it) do not count.
        """
        found = self._upstreams.get(upstream)
        return found.held_tokens(model, ids, as_of_s) if found is not None else None

    def caught_up_s(self, upstream: str) -> float:
        """When ``upstream``'s latest event batch was received (-inf: none, or not followed)."""
        found = self._upstreams.get(upstream)
        return found.caught_up_s if found is not None else float("-inf")

    # -- what people see -------------------------------------------------------------

    def view(self) -> dict[str, dict[str, Any]]:
        """Per upstream: where its events come from, whether they are exact, the counters."""
        return {name: u.view() for name, u in self._upstreams.items()}

    def families(self) -> list[Metric]:
        """The ``kvern_kv_events_*`` families for ``/metrics``, one series per upstream."""
        views = self.view()
        gauges = {
            "exact": "1 when the upstream's presence comes from its KV events, 0 when kvern "
            "falls back to its model (before the first batch, after a lost batch, while "
            "the publisher is away)",
            "blocks_held": "Blocks the upstream holds, as its KV events tell",
        }
        counters = {
            "events_applied": "KV events applied (BlockStored, BlockRemoved, AllBlocksCleared)",
            "gaps": "Holes in the upstream's event stream the replay could not fill",
            "missed_batches": "Event batches inside those holes",
            "replays": "Replays asked of the upstream's replay endpoint",
            "replayed_batches": "Event batches recovered by replays",
            "replay_failures": "Replays that timed out or broke off",
            "resets": "Restarts of the upstream's publisher seen (its presence cleared)",
            "disconnects": "Times the connection to the upstream's publisher dropped",
            "fallbacks": "Times the upstream's presence stopped being exact and fell back to "
            "kvern's model",
        }
        out: list[Metric] = []
        for key, text in gauges.items():
            family = GaugeMetricFamily(f"kvern_kv_events_{key}", text, labels=["upstream"])
            for name, view in views.items():
                family.add_metric([name], int(view[key]))
            out.append(family)
        for key, text in counters.items():
            counter = CounterMetricFamily(f"kvern_kv_events_{key}", text, labels=["upstream"])
            for name, view in views.items():
                counter.add_metric([name], view[key])
            out.append(counter)
        answers = CounterMetricFamily(
            "kvern_kv_events_answers",
            "Presence questions about the upstream, by what answered (events or model)",
            labels=["upstream", "source"],
        )
        for name, view in views.items():
            for source, count in view["answers"].items():
                answers.add_metric([name, source], count)
        out.append(answers)
        return out
