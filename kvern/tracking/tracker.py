"""Tracking beside the request: tokenize, walk the trie, record -- never in the way.

This runs in the brain (see :mod:`kvern.tracking.brain`), away from the relay's
event loop. All tracking work (rendering, tokenization, trie insert,
lock/unlock, eviction, reading the trie for the endpoints) runs on ONE worker
thread, in the order the relay handed requests over. One thread means the trie
is never touched concurrently, so it needs no lock, and the order of inserts
is the order requests reached the backend. Routing questions take the thread's
urgent lane, ahead of queued bookkeeping.

Nothing here may fail or slow a request: every step is wrapped, errors are
counted by kind and logged once without prompt text, a request costs bounded
work (a prompt body beyond what a backend context could hold is skipped, an
answer is re-tokenized up to one context), and when the thread falls behind
by more than ``max_pending`` jobs new requests pass through untracked (and
counted) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.config import KvernConfig, NormalizationRule
from kvern.prompt.normalize import Normalizer
from kvern.prompt.requests import TRACKED_ENDPOINTS, read_prompt
from kvern.routing.book import PresenceBook
from kvern.routing.prefix_answer import PrefixAnswer
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.bookkeeping import Bookkeeper, PresenceFeed, Served
from kvern.tracking.divergence import DivergenceFinder
from kvern.tracking.forest import TrieForest
from kvern.tracking.queue import TrackingQueue
from kvern.tracking.records import Outcome, Prediction, RequestContext, to_record
from kvern.upstream.usage import ResponseFacts, parse_response

logger = logging.getLogger(__name__)

# Bytes of request body per token of context, at most: a body larger than
# max_context_tokens times this cannot fit any backend's context whole.
_BODY_BYTES_PER_TOKEN = 8


@dataclass(slots=True)
class _Asked:
    """A routing question answered, waiting for the relay to say where the request went."""

    tok: ModelTokenizer
    model: str
    prompt: PromptTokens | None = None  # None until tokenized, or nothing to track


def _trackable(ctx: RequestContext) -> bool:
    return ctx.endpoint in TRACKED_ENDPOINTS and ctx.model is not None


class Tracker(TrackingQueue):
    """Owns the tracking thread, the per-model tries and the path to analytics."""

    def __init__(
        self,
        config: KvernConfig,
        *,
        registry: TokenizerRegistry,
        forest: TrieForest,
        record: Callable[[RequestRecord], Any] | None,
        clock: Callable[[], float] = time.time,
        max_pending: int = 512,
        presence: PresenceBook | None = None,
        shared_feed: PresenceFeed | None = None,
    ) -> None:
        super().__init__(registry, max_pending=max_pending)
        self._config = config
        self._forest = forest
        self._record = record
        self._clock = clock
        # With several upstreams: which upstream holds which prefix (see kvern.routing).
        self.presence = presence
        self._normalizers: dict[str, Normalizer] = {}
        # request id -> its prediction job (one per request, however it began).
        self._jobs: dict[str, Future[Prediction | None]] = {}
        # request id -> its answered routing question, until the relay commits it.
        self._asked: dict[str, _Asked] = {}
        self._max_body_bytes = config.tracking.max_context_tokens * _BODY_BYTES_PER_TOKEN
        # Model names given per-model state (a trie, a cache model, a tokenizer
        # entry), at most tracking.max_models: names come from clients.
        self._models: set[str] = set()
        self._max_models = config.tracking.max_models
        self._books = Bookkeeper(config, forest, presence, self.stats, clock, shared_feed)
        # Told each request's time per phase (render, tokenize, trie) for /metrics.
        self.on_phase: Callable[[str, float], None] | None = None
        # Told each inserted prompt's ids (model, ids): the live capacity curve.
        self.on_prompt: Callable[[str, Sequence[int]], None] | None = None

    @property
    def divergence(self) -> DivergenceFinder:
        """Where prompts parted from earlier ones, and a few prompts per site."""
        return self._books.divergence

    def _admits(self, model: str, *, count: bool = True) -> bool:
        """Whether ``model`` is tracked: a name seen before, or a new one within max_models.

        A new name past the bound passes untracked, counted (``count``) and
        logged once: every name would otherwise keep a trie and its prompts
        for as long as the brain lives.
        """
        if model in self._models:
            return True
        if len(self._models) < self._max_models:
            self._models.add(model)
            return True
        if count:
            self.stats.skip("too_many_models")
            if "too_many_models" not in self._logged_kinds:
                self._logged_kinds.add("too_many_models")
                logger.warning(
                    "tracking.max_models (%d) model names are tracked; requests for other "
                    "names pass untracked from now on (counted in /health)",
                    self._max_models,
                )
        return False

    def set_normalization(self, rules: dict[str, list[NormalizationRule]]) -> Future[None]:
        """New normalization rules, swapped in on the tracking thread behind every queued job.

        Requests handed over before the change are tokenized with the old
        rules, every later one with the new; the cached normalizers go with
        the old rules (segments cached by the incremental tokenizer are keyed
        by their normalized text, so they stay right).
        """

        def swap() -> None:
            self._config = self._config.model_copy(update={"normalization": rules})
            self._normalizers.clear()

        return self._executor.submit(swap)

    def _normalizer(self, model: str) -> Normalizer:
        norm = self._normalizers.get(model)
        if norm is None:
            norm = Normalizer.from_rules(self._config.rules_for(model))
            self._normalizers[model] = norm
        return norm

    # -- prediction (routing question, commit, first byte) -------------------------

    def begin(self, ctx: RequestContext, body: bytes, *, insert: bool) -> None:
        """Start tracking ``ctx``; returns at once. A request committed by routing is skipped.

        The relay sends this when the upstream's first byte arrives: by then the
        backend has finished this prompt's prefill, so its KV is in the
        backend's cache. ``insert=False`` (failed requests) matches the prompt
        without adding it: a backend that refused a request cached nothing.

        With the tokenizer loaded, the job goes straight onto the tracking
        thread's queue, so jobs run in the order requests reached this point
        and a request's answer is settled (see :meth:`complete`) before any
        later request is predicted.
        """
        if ctx.request_id in self._jobs:
            return  # already predicted when it was routed
        if not _trackable(ctx) or not body:
            self.stats.num_untracked += 1
            return
        if self._pending >= self._max_pending:
            self.stats.num_skipped_backlog += 1
            return
        assert ctx.model is not None
        if not self._admits(ctx.model):
            return
        model, endpoint, upstream = ctx.model, ctx.endpoint, ctx.upstream
        job = self._new_prediction_job(ctx)

        def submit(tok: ModelTokenizer) -> None:
            inner = self._executor.submit(
                self._predict_guarded, tok, model, endpoint, body, insert, upstream, ctx.ts_s
            )
            # Runs on the tracking thread as the job ends, before the next job starts.
            inner.add_done_callback(lambda f: job.set_result(f.result()))

        self._in_order(model, submit)

    def _new_prediction_job(self, ctx: RequestContext) -> Future[Prediction | None]:
        """The future ``ctx``'s prediction lands in; counted in the backlog until it does."""
        self._pending += 1
        job: Future[Prediction | None] = Future()
        job.add_done_callback(self._job_done)
        self._jobs[ctx.request_id] = job
        return job

    def ask(self, ctx: RequestContext, body: bytes) -> Future[PrefixAnswer | None] | None:
        """The prompt's longest prefix on every upstream, as an urgent job; None at once if unknown.

        None when routing cannot use the trie now (nothing to track, the
        model's tokenizer still loading, tracking behind): the relay then
        routes by load alone and tracks at the first byte. Nothing is marked
        or inserted here: only :meth:`commit`, told where the request really
        went, does that -- so a decision that came too late for the relay
        never books a prefix on an upstream that did not get the request.
        """
        if not _trackable(ctx) or not body or self.presence is None:
            return None
        if self._pending >= self._max_pending:
            return None
        assert ctx.model is not None
        if not self._admits(ctx.model, count=False):  # counted at its first byte
            return None
        model, endpoint = ctx.model, ctx.endpoint
        tok = self._registry.loaded(model) if model not in self._waiting else None
        if tok is None:
            return None
        asked = self._asked[ctx.request_id] = _Asked(tok, model)
        presence = self.presence
        answer: Future[PrefixAnswer | None] = Future()

        def run() -> None:
            try:
                asked.prompt = self._tokenize(tok, model, endpoint, body)
                if asked.prompt is None:
                    answer.set_result(None)
                    return
                ids = asked.prompt.ids
                mt = self._forest.get(model)
                match = presence.for_model(mt).match(ids)
                cached, in_flight = presence.for_router(mt, match, ids)
                hot = match.requests_per_s(max(cached.values(), default=0), self._clock())
                answer.set_result(match.answer(cached, hot, in_flight))
            except Exception as exc:  # noqa: BLE001 - the relay routes by load instead
                self._count_error("route", exc)
                asked.prompt = None
                if not answer.done():
                    answer.set_result(None)

        self._executor.submit(run, urgent=True)
        return answer

    def commit(self, ctx: RequestContext, upstream: str | None) -> None:
        """The asked request went to ``upstream`` (None: nowhere): predict, insert and mark there.

        An urgent job, right behind its own question: the next request sharing
        this new prefix then follows it to the same upstream.
        """
        asked = self._asked.pop(ctx.request_id, None)
        if asked is None or upstream is None:
            return
        job = self._new_prediction_job(ctx)

        def run() -> None:
            prediction: Prediction | None = None
            try:
                if asked.prompt is not None:
                    prediction = self._predict(
                        asked.tok, asked.model, asked.prompt, True, upstream, ctx.ts_s
                    )
            except Exception as exc:  # noqa: BLE001 - tracking never fails a request
                self._count_error("commit", exc)
            finally:
                job.set_result(prediction)

        self._executor.submit(run, urgent=True)

    def _predict_guarded(
        self,
        tok: ModelTokenizer,
        model: str,
        endpoint: str,
        body: bytes,
        insert: bool,
        upstream: str,
        arrived_s: float,
    ) -> Prediction | None:
        try:
            prompt = self._tokenize(tok, model, endpoint, body)
            if prompt is None:
                return None
            return self._predict(tok, model, prompt, insert, upstream, arrived_s)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a request
            self._count_error("predict", exc)
            return None

    def _predict(
        self, tok: ModelTokenizer, model: str, prompt: PromptTokens, insert: bool, upstream: str,
        arrived_s: float | None = None,  # wall clock: what an upstream's events are read as of
    ) -> Prediction:  # fmt: skip
        started = time.perf_counter()
        prediction = self._books.predict(tok, model, prompt, insert, upstream, arrived_s)
        if self.on_phase is not None:
            self.on_phase("trie", time.perf_counter() - started)
        if insert and self.on_prompt is not None:
            self.on_prompt(model, prompt.ids)
        return prediction

    def _tokenize(
        self, tok: ModelTokenizer, model: str, endpoint: str, body: bytes
    ) -> PromptTokens | None:
        """The prompt's tokens, or None (counted) when there is none or it is out of bounds."""
        if len(body) > self._max_body_bytes:
            self.stats.skip("prompt_over_context")
            return None
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        asked = read_prompt(endpoint, parsed) if isinstance(parsed, dict) else None
        if asked is None:
            self.stats.num_untracked += 1
            return None
        started = time.perf_counter()
        prompt = tok.request(asked, normalizer=self._normalizer(model))
        if self.on_phase is not None:
            self.on_phase("render", prompt.render_s)
            self.on_phase("tokenize", time.perf_counter() - started - prompt.render_s)
        return prompt

    # -- completion (after the response) -------------------------------------------

    def complete(
        self, ctx: RequestContext, outcome: Outcome, *, body: bytes, content_type: str
    ) -> None:
        """Record ``ctx`` once its response is over (or failed); returns at once.

        Settling (reading the answer, telling the cache model what the backend
        now holds) is queued on the tracking thread right now, so it runs
        before the prediction of any request whose first byte comes later.
        A request that was never predicted still has its answer read, for the
        usage figures of its row.
        """
        job = self._jobs.pop(ctx.request_id, None)
        done: Future[tuple[Prediction | None, ResponseFacts]] = Future()
        settled = asyncio.wrap_future(done)
        status = outcome.status
        served = Served(ctx.upstream, status is not None and status < 400)
        model = ctx.model

        def submit(_: ModelTokenizer | None = None) -> None:
            inner = self._executor.submit(
                self._settle_guarded, model, job, body, content_type, served
            )
            inner.add_done_callback(lambda f: done.set_result(f.result()))

        if job is None or model is None:
            submit()
        else:
            self._in_order(model, submit)
        self._spawn(self._record_when(ctx, settled, outcome))

    def _settle_guarded(
        self,
        model: str | None,
        job: Future[Prediction | None] | None,
        body: bytes,
        content_type: str,
        served: Served,
    ) -> tuple[Prediction | None, ResponseFacts]:
        """On the tracking thread: the prediction job ran before this one (FIFO).

        A predicted request is settled whatever its answer holds: settling is
        what releases its prompt's lock in the trie (and a llama.cpp slot).
        An answer that cannot be read (JSON nested past Python's parser) only
        loses its figures; skipping the settle with it pinned that path for
        ever, and the trie grew past its cap one such request at a time.
        """
        prediction: Prediction | None = None
        facts = ResponseFacts()
        try:
            prediction = job.result() if job is not None else None
            if body:
                facts = parse_response(body, content_type)
        except Exception as exc:  # noqa: BLE001 - the row goes without the answer's figures
            self._count_error("finish", exc)
        try:
            if prediction is not None and model is not None:
                self._books.settle(model, prediction, facts, served)
        except Exception as exc:  # noqa: BLE001
            self._count_error("settle", exc)
        return prediction, facts

    async def _record_when(
        self,
        ctx: RequestContext,
        settled: asyncio.Future[tuple[Prediction | None, ResponseFacts]],
        outcome: Outcome,
    ) -> None:
        prediction, facts = await settled
        if self._record is None:
            return
        try:
            self._record(to_record(ctx, prediction, facts, outcome))
        except Exception as exc:  # noqa: BLE001
            self._count_error("record", exc)
