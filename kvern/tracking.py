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
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvern.analytics.records import RequestRecord
from kvern.config import KvernConfig
from kvern.forest import TrieForest
from kvern.normalize import Normalizer
from kvern.tokenization import ModelTokenizer, PromptTokens, TokenizerRegistry
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode
from kvern.usage import ResponseFacts, parse_response

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRACKED_ENDPOINTS = frozenset({"chat", "completions", "ollama_chat", "ollama_generate"})


@dataclass(slots=True)
class Prediction:
    """What the trie says about one request's prompt."""

    prompt_tokens: int  # kvern's count of the prompt
    matched_tokens: int  # prompt tokens already in the trie (predicted reusable)
    matched_tokens_aligned: int  # the same, floored to the backend's block size
    hit: bool  # matched >= min_prefix_tokens
    tokenizer_kind: str  # "exact" or "fallback"
    node: TrieNode | None  # locked while the request is in flight


@dataclass(slots=True)
class RequestContext:
    """A request in flight, from arrival to its analytics row."""

    request_id: str  # kvern's id (also sent back as x-kvern-request-id)
    ts_s: float  # wall-clock arrival time
    start_s: float  # monotonic arrival time, for latencies
    endpoint: str  # chat, completions, ollama_chat, ollama_generate, other
    model: str | None  # the body's model
    tenant: str | None  # hash of the API key or the user field
    stream: bool  # the client asked for a stream
    upstream: str  # upstream name
    prediction: asyncio.Future[Prediction | None] | None = None  # tracking result


def tenant_of(authorization: str | None, body: dict[str, Any] | None) -> str | None:
    """A stable, non-reversible tenant id: the ``user`` field, else the API key, hashed."""
    user = body.get("user") if isinstance(body, dict) else None
    if isinstance(user, str) and user:
        return "user:" + hashlib.sha256(user.encode()).hexdigest()[:16]
    if authorization:
        key = authorization.removeprefix("Bearer ").strip()
        if key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return None


def _prompt_of(
    tok: ModelTokenizer, endpoint: str, body: dict[str, Any], norm: Normalizer
) -> PromptTokens | None:
    """Tokenize a request body the way its endpoint's backend would."""
    if endpoint in ("chat", "ollama_chat"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return tok.chat(messages, tools=tools, normalizer=norm)
    if endpoint == "ollama_generate":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        if body.get("raw") is True:
            return tok.completion(prompt, normalizer=norm)
        messages = []
        if isinstance(body.get("system"), str):
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": prompt})
        return tok.chat(messages, normalizer=norm)
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tok.completion(prompt, normalizer=norm)
    return None


@dataclass(slots=True)
class TrackerStats:
    """Counters shown in /health and /metrics."""

    num_tracked: int = 0  # requests whose prompt reached the trie
    num_skipped_backlog: int = 0  # requests passed through untracked: tracking was behind
    num_untracked: int = 0  # requests with nothing to track (no model, odd body)
    errors: dict[str, int] = field(default_factory=dict)  # tracking errors by kind


class Tracker:
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
    ) -> None:
        self._config = config
        self._registry = registry
        self._forest = forest
        self._record = record
        self._clock = clock
        self._max_pending = max_pending
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvern-tracking")
        self._normalizers: dict[str, Normalizer] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._logged_kinds: set[str] = set()
        self.stats = TrackerStats()

    # -- helpers -----------------------------------------------------------------

    def _count_error(self, kind: str, exc: BaseException) -> None:
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            # The type only: an exception message may quote prompt text.
            logger.warning("tracking error (%s): %s; counted from now on", kind, type(exc).__name__)

    def _normalizer(self, model: str) -> Normalizer:
        norm = self._normalizers.get(model)
        if norm is None:
            norm = Normalizer.from_rules(self._config.rules_for(model))
            self._normalizers[model] = norm
        return norm

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the tracking thread (where the tries live)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- prediction (at arrival) ---------------------------------------------------

    def begin(self, ctx: RequestContext, body: dict[str, Any] | None, *, insert: bool) -> None:
        """Start tracking ``ctx``; returns at once.

        The proxy calls this when the upstream's first byte arrives: by then the
        backend has finished this prompt's prefill, so its KV is in the
        backend's cache, and tracking work never competes with the request
        before its first byte. ``insert=False`` (failed requests) matches the
        prompt without adding it: a backend that refused a request cached nothing.
        """
        if ctx.endpoint not in TRACKED_ENDPOINTS or ctx.model is None or body is None:
            self.stats.num_untracked += 1
            return
        if self._pending >= self._max_pending:
            self.stats.num_skipped_backlog += 1
            return
        self._pending += 1
        ctx.prediction = self._spawn(self._predict(ctx.model, ctx.endpoint, body, insert))

    async def _predict(
        self, model: str, endpoint: str, body: dict[str, Any], insert: bool
    ) -> Prediction | None:
        try:
            tok = await self._registry.get(model)
            return await self.in_thread(self._predict_sync, tok, model, endpoint, body, insert)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a request
            self._count_error("predict", exc)
            return None
        finally:
            self._pending -= 1

    def _predict_sync(
        self, tok: ModelTokenizer, model: str, endpoint: str, body: dict[str, Any], insert: bool
    ) -> Prediction | None:
        prompt = _prompt_of(tok, endpoint, body, self._normalizer(model))
        if prompt is None:
            self.stats.num_untracked += 1
            return None
        mt = self._forest.get(model)
        now = self._clock()
        node: TrieNode | None = None
        if insert:
            result = mt.trie.insert(prompt.ids, now)
            mt.trie.lock(result.node)
            mt.trie.maintain(mt.max_tokens, now)
            matched, node = result.matched_tokens, result.node
        else:
            matched = mt.trie.match(prompt.ids).matched_tokens
        self.stats.num_tracked += 1
        return Prediction(
            prompt_tokens=len(prompt.ids),
            matched_tokens=matched,
            matched_tokens_aligned=RadixTrie.aligned(matched, mt.block_size),
            hit=matched >= self._config.trie.min_prefix_tokens,
            tokenizer_kind=prompt.kind,
            node=node,
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
        """Record ``ctx`` once its response is over (or failed); returns at once."""
        latency_ms = (time.perf_counter() - ctx.start_s) * 1000.0
        self._spawn(self._finish(ctx, status, error, ttfb_ms, latency_ms, body, content_type))

    async def _finish(
        self,
        ctx: RequestContext,
        status: int | None,
        error: str | None,
        ttfb_ms: float | None,
        latency_ms: float,
        body: bytes,
        content_type: str,
    ) -> None:
        prediction: Prediction | None = None
        facts = ResponseFacts()
        try:
            if ctx.prediction is not None:
                prediction = await ctx.prediction
            if body:
                facts = await self.in_thread(parse_response, body, content_type)
            if prediction is not None and prediction.node is not None and ctx.model is not None:
                await self.in_thread(self._unlock, ctx.model, prediction.node)
        except Exception as exc:  # noqa: BLE001
            self._count_error("finish", exc)
        if self._record is None:
            return
        try:
            self._record(
                self._to_record(ctx, prediction, facts, status, error, ttfb_ms, latency_ms)
            )
        except Exception as exc:  # noqa: BLE001
            self._count_error("record", exc)

    def _unlock(self, model: str, node: TrieNode) -> None:
        found = self._forest.peek(model)
        if found is not None:
            found.trie.unlock(node)

    def _to_record(
        self,
        ctx: RequestContext,
        p: Prediction | None,
        facts: ResponseFacts,
        status: int | None,
        error: str | None,
        ttfb_ms: float | None,
        latency_ms: float,
    ) -> RequestRecord:
        reported, source = facts.reported_cached_tokens, facts.reported_cached_source
        if reported is None and facts.prompt_eval_count is not None and p is not None:
            # Ollama reports the prompt tokens it evaluated; the rest came from its cache.
            reported = max(0, p.prompt_tokens - facts.prompt_eval_count)
            source = "ollama.prompt_eval_count"
        return RequestRecord(
            request_id=ctx.request_id,
            ts_s=ctx.ts_s,
            model=ctx.model or "",
            tenant=ctx.tenant,
            endpoint=ctx.endpoint,
            upstream=ctx.upstream,
            stream=ctx.stream,
            status=status,
            error=error,
            prompt_tokens=p.prompt_tokens if p else None,
            matched_tokens=p.matched_tokens if p else None,
            matched_tokens_aligned=p.matched_tokens_aligned if p else None,
            hit=p.hit if p else None,
            tokenizer_kind=p.tokenizer_kind if p else None,
            ttfb_ms=ttfb_ms,
            latency_ms=latency_ms,
            completion_tokens=facts.completion_tokens,
            upstream_prompt_tokens=facts.upstream_prompt_tokens
            if facts.upstream_prompt_tokens is not None
            else facts.prompt_eval_count,
            reported_cached_tokens=reported,
            reported_cached_source=source,
            finish_reason=facts.finish_reason,
        )

    async def drain(self) -> None:
        """Wait for every tracking task in flight (graceful shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        self._executor.shutdown(wait=True)
