"""Tracking beside the request: tokenize, walk the trie, record -- never in the way.

Why a dedicated thread: the request must go upstream at once and its bytes
must be relayed as they come. Tokenizing a 4,000-token prompt and walking the
trie take milliseconds of CPU; on the event loop that would delay every other
user's stream. So all tracking work (rendering, tokenization, trie insert,
lock/unlock, eviction, reading the trie for the endpoints) runs on ONE worker
thread, in arrival order. One thread means the trie is never touched
concurrently, so it needs no lock, and the order of inserts is the order
requests arrived -- the order the backend saw them.

Nothing here may fail or slow a request: every step is wrapped, errors are
counted by kind and logged once without prompt text, and when the tracking
thread falls behind by more than ``max_pending`` jobs new requests are passed
through untracked (and counted) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kvern.analytics.records import RequestRecord
from kvern.config import KvernConfig
from kvern.prompt.normalize import Normalizer
from kvern.prompt.requests import TRACKED_ENDPOINTS, read_prompt
from kvern.routing.book import PresenceBook, RouteHandle
from kvern.routing.presence import PresenceMatch
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.forest import TrieForest
from kvern.tracking.queue import TrackingQueue
from kvern.tracking.records import Prediction, RequestContext, to_record
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode
from kvern.upstream.usage import ResponseFacts, parse_response

logger = logging.getLogger(__name__)

# A request waiting longer than this for its first byte no longer holds tracking back.
_STALE_HOLD_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Served:
    """Which upstream answered a request in the end (after any failover), and whether it did."""

    upstream: str
    ok: bool


class Tracker(TrackingQueue):
    """Owns the tracking thread, the per-model tries and the path to analytics."""

    def __init__(
        self,
        config: KvernConfig,
        *,
        registry: TokenizerRegistry,
        forest: TrieForest,
        record: Callable[[RequestRecord], bool] | None,
        clock: Callable[[], float] = time.time,
        max_pending: int = 512,
        max_yield_s: float = 0.05,
        presence: PresenceBook | None = None,
    ) -> None:
        super().__init__(registry, max_pending=max_pending, max_yield_s=max_yield_s)
        self._config = config
        self._forest = forest
        self._record = record
        self._clock = clock
        # With several upstreams: which upstream holds which prefix (see kvern.routing).
        self.presence = presence
        self._normalizers: dict[str, Normalizer] = {}

    def _normalizer(self, model: str) -> Normalizer:
        norm = self._normalizers.get(model)
        if norm is None:
            norm = Normalizer.from_rules(self._config.rules_for(model))
            self._normalizers[model] = norm
        return norm

    # -- prediction (at arrival) ---------------------------------------------------

    def begin(self, ctx: RequestContext, body: dict[str, Any] | None, *, insert: bool) -> None:
        """Start tracking ``ctx``; returns at once.

        The proxy calls this when the upstream's first byte arrives: by then the
        backend has finished this prompt's prefill, so its KV is in the
        backend's cache, and tracking work never competes with the request
        before its first byte. ``insert=False`` (failed requests) matches the
        prompt without adding it: a backend that refused a request cached nothing.

        With the tokenizer loaded, the job goes straight onto the tracking
        thread's queue, so jobs run in the order requests reached this point
        and a request's answer is settled (see :meth:`complete`) before any
        later request is predicted.
        """
        if ctx.prediction_job is not None:
            return  # already predicted when it was routed
        if ctx.endpoint not in TRACKED_ENDPOINTS or ctx.model is None or body is None:
            self.stats.num_untracked += 1
            return
        if self._pending >= self._max_pending:
            self.stats.num_skipped_backlog += 1
            return
        model, endpoint = ctx.model, ctx.endpoint
        job = self._new_prediction_job(ctx)
        upstream = ctx.upstream

        def submit(tok: ModelTokenizer) -> None:
            inner = self._executor.submit(
                self._predict_guarded, tok, model, endpoint, body, insert, upstream
            )
            # Runs on the tracking thread as the job ends, before the next job starts.
            inner.add_done_callback(lambda f: job.set_result(f.result()))

        self._in_order(model, submit)

    def _new_prediction_job(self, ctx: RequestContext) -> Future[Prediction | None]:
        """The future ``ctx``'s prediction lands in; counted in the backlog until it does."""
        self._pending += 1
        job: Future[Prediction | None] = Future()
        job.add_done_callback(self._job_done)
        ctx.prediction_job = job
        ctx.prediction = asyncio.wrap_future(job)
        return job

    def route(
        self,
        ctx: RequestContext,
        body: dict[str, Any] | None,
        decide: Callable[[PresenceMatch, float], Any],
    ) -> asyncio.Future[Any] | None:
        """Match the prompt against every upstream's presence, let ``decide`` pick, record it.

        Runs as an urgent job on the tracking thread (ahead of queued
        bookkeeping). ``decide(match, now)`` returns a choice whose
        ``replica.name`` is the upstream; the prompt is inserted and marked
        there at once, and the request's prediction is made (so :meth:`begin`
        does nothing later). Returns a future of the choice -- None when the
        prompt gave no tokens -- or None at once when routing cannot use the
        trie now (nothing to track, the model's tokenizer still loading,
        tracking behind); the caller then routes by load alone.
        """
        if ctx.endpoint not in TRACKED_ENDPOINTS or ctx.model is None or body is None:
            return None
        if self.presence is None or self._pending >= self._max_pending:
            return None
        model, endpoint = ctx.model, ctx.endpoint
        tok = self._registry.loaded(model) if model not in self._waiting else None
        if tok is None:
            return None
        job = self._new_prediction_job(ctx)
        chosen: Future[Any] = Future()

        def pick(match: PresenceMatch, now: float) -> str:
            choice = decide(match, now)
            chosen.set_result(choice)
            return str(choice.replica.name)

        def run() -> None:
            prediction: Prediction | None = None
            try:
                prediction = self._predict_sync(
                    tok, model, endpoint, body, True, ctx.upstream, route=pick
                )
            except Exception as exc:  # noqa: BLE001 - handed to the router or counted
                if not chosen.done():
                    chosen.set_exception(exc)
                else:
                    self._count_error("route", exc)
            finally:
                job.set_result(prediction)
                if not chosen.done():
                    chosen.set_result(None)

        self._executor.submit(run, urgent=True)
        return asyncio.wrap_future(chosen)

    def _predict_guarded(
        self,
        tok: ModelTokenizer,
        model: str,
        endpoint: str,
        body: dict[str, Any],
        insert: bool,
        upstream: str,
    ) -> Prediction | None:
        self._yield_to_requests()
        try:
            return self._predict_sync(tok, model, endpoint, body, insert, upstream)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a request
            self._count_error("predict", exc)
            return None

    def _predict_sync(
        self,
        tok: ModelTokenizer,
        model: str,
        endpoint: str,
        body: dict[str, Any],
        insert: bool,
        upstream: str,
        route: Callable[[PresenceMatch, float], str] | None = None,
    ) -> Prediction | None:
        """Tokenize, predict, insert and lock; ``route`` (given a match) picks the upstream."""
        asked = read_prompt(endpoint, body)
        if asked is None:
            self.stats.num_untracked += 1
            return None
        prompt = tok.request(asked, normalizer=self._normalizer(model))
        mt = self._forest.get(model)
        now = self._clock()
        node: TrieNode | None = None
        predicted: int | None = None
        handle: Any = None
        backend_model, block_size = mt.cache_model.name, mt.cache_model.block_size
        if not insert:
            matched = mt.trie.match(prompt.ids).matched_tokens
        else:
            # Predict first: the trie must not yet hold this prompt.
            if self.presence is not None:
                match = self.presence.for_model(mt).match(prompt.ids)
                if route is not None:
                    upstream = route(match, now)
                handle = self.presence.handle(match, upstream, now)
                predicted = handle.predicted
                backend_model = "routed"
                block_size = self.presence.caches[upstream].block_size
            else:
                start = mt.cache_model.start(mt.trie, prompt.ids, now)
                predicted, handle = start.predicted_cached_tokens, start.handle
            result = mt.trie.insert(prompt.ids, now)
            mt.trie.lock(result.node)
            if self.presence is not None:
                self.presence.commit(mt, result.node, upstream, now)
            mt.trie.maintain(mt.max_tokens, now)
            matched, node = result.matched_tokens, result.node
        self.stats.num_tracked += 1
        return Prediction(
            prompt_tokens=len(prompt.ids),
            matched_tokens=matched,
            matched_tokens_aligned=RadixTrie.aligned(matched, mt.block_size),
            hit=matched >= self._config.trie.min_prefix_tokens,
            tokenizer_kind=prompt.kind,
            node=node,
            predicted_cached_tokens=predicted,
            backend_model=backend_model,
            block_size=block_size,
            ids=prompt.ids if insert else None,
            tokenizer=tok,
            handle=handle,
        )

    # -- completion (after the response) -------------------------------------------

    def complete(
        self,
        ctx: RequestContext,
        *,
        status: int | None,
        error: str | None,
        ttfb_ms: float | None,
        body: bytes,
        content_type: str,
    ) -> None:
        """Record ``ctx`` once its response is over (or failed); returns at once.

        Settling (reading the answer, telling the cache model what the backend
        now holds) is queued on the tracking thread right now, so it runs
        before the prediction of any request whose first byte comes later.
        """
        latency_ms = (time.perf_counter() - ctx.start_s) * 1000.0
        job = ctx.prediction_job
        if job is None or ctx.model is None:
            nothing: Future[tuple[Prediction | None, ResponseFacts]] = Future()
            nothing.set_result((None, ResponseFacts()))
            settled = asyncio.wrap_future(nothing)
        else:
            model = ctx.model
            done: Future[tuple[Prediction | None, ResponseFacts]] = Future()
            settled = asyncio.wrap_future(done)
            served = _Served(ctx.upstream, status is not None and status < 400)

            def submit(_: ModelTokenizer) -> None:
                inner = self._executor.submit(
                    self._settle_guarded, model, job, body, content_type, served
                )
                inner.add_done_callback(lambda f: done.set_result(f.result()))

            self._in_order(model, submit)
        self._spawn(self._record_when(ctx, settled, status, error, ttfb_ms, latency_ms))

    def _settle_guarded(
        self,
        model: str | None,
        job: Future[Prediction | None],
        body: bytes,
        content_type: str,
        served: _Served,
    ) -> tuple[Prediction | None, ResponseFacts]:
        """On the tracking thread: the prediction job ran before this one (FIFO)."""
        prediction: Prediction | None = None
        facts = ResponseFacts()
        self._yield_to_requests()
        try:
            prediction = job.result()
            if body:
                facts = parse_response(body, content_type)
            if prediction is not None and model is not None:
                self._settle(model, prediction, facts, served)
        except Exception as exc:  # noqa: BLE001
            self._count_error("finish", exc)
        return prediction, facts

    async def _record_when(
        self,
        ctx: RequestContext,
        settled: asyncio.Future[tuple[Prediction | None, ResponseFacts]],
        status: int | None,
        error: str | None,
        ttfb_ms: float | None,
        latency_ms: float,
    ) -> None:
        prediction, facts = await settled
        if self._record is None:
            return
        try:
            self._record(
                to_record(
                    ctx,
                    prediction,
                    facts,
                    status=status,
                    error=error,
                    ttfb_ms=ttfb_ms,
                    latency_ms=latency_ms,
                )
            )
        except Exception as exc:  # noqa: BLE001
            self._count_error("record", exc)

    def _settle(self, model: str, p: Prediction, facts: ResponseFacts, served: _Served) -> None:
        """After the answer: the backend now holds prompt + answer; tell the cache model."""
        mt = self._forest.peek(model)
        if mt is None or p.node is None:
            return  # nothing was inserted (a failed request): nothing to settle
        held = p.node
        now = self._clock()
        gen = self._generated_ids(p, facts) if served.ok else None
        if gen is not None and p.ids is not None:
            full = array("i", p.ids)
            full.extend(gen)
            held = mt.trie.insert(full, now, count_hit=False).node
        if isinstance(p.handle, RouteHandle) and self.presence is not None:
            if served.ok:
                reported = facts.reported_cached_tokens
                self.presence.settle(mt, held, p.handle, served.upstream, reported, now)
        else:
            mt.cache_model.finish(mt.trie, p.handle, held, now)
        mt.trie.unlock(p.node)
        p.ids = None  # drop the prompt's ids now

    def _generated_ids(self, p: Prediction, facts: ResponseFacts) -> array[int] | None:
        """The answer's tokens the backend fed back through the model (all but the last).

        The backend holds the ids it sampled; kvern sees their text, so the
        answer is re-tokenized -- exact for the usual canonical output.
        """
        if not self._config.upstream.cache_model.cache_generated or p.tokenizer is None:
            return None
        if not facts.completion_text:
            return None
        gen = p.tokenizer.encode_text(facts.completion_text)
        evaluated = (facts.completion_tokens or len(gen)) - 1
        return gen[: max(0, min(evaluated, len(gen)))] or None
