"""A tracked request's records: the request in flight, the trie's prediction, its analytics row.

Why a module of their own: the proxy fills in a :class:`RequestContext`, the
tracking thread answers with a :class:`Prediction`, and :func:`to_record`
flattens both, with what the backend reported, into the one
:class:`~kvern.analytics.records.RequestRecord` analytics keeps. None of this
needs the tracking thread's machinery in :mod:`kvern.tracking.tracker`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.diagnosis.reasons import assign
from kvern.diagnosis.sites import Divergence
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.trie.node import TrieNode
from kvern.upstream.usage import ResponseFacts


@dataclass(slots=True)
class Prediction:
    """What the trie says about one request's prompt."""

    prompt_tokens: int  # kvern's count of the prompt
    matched_tokens: int  # prompt tokens already in the trie (predicted reusable)
    matched_tokens_aligned: int  # the same, floored to the backend's block size
    hit: bool  # matched >= min_prefix_tokens
    tokenizer_kind: str  # "exact" or "fallback"
    node: TrieNode | None  # locked while the request is in flight
    predicted_cached_tokens: int | None = None  # by the backend's cache model
    backend_model: str | None = None  # which cache model predicted it
    block_size: int | None = None  # the block size it counted in
    ids: array[int] | None = None  # the prompt's ids (to extend with the answer)
    tokenizer: ModelTokenizer | None = None  # to tokenize the answer
    handle: Any = None  # the cache model's handle (a slot)
    continued: bool = False  # an earlier prompt went on past the match (diverged)
    reach: int = 0  # how far that earlier prompt went (tokens)
    best_elsewhere: int = 0  # the longest prefix another upstream held (routing)
    divergence: Divergence | None = None  # where it diverged, when it did


@dataclass(slots=True)
class RequestContext:
    """A request in flight, from arrival to its analytics row.

    The relay fills it in and sends a copy with every message to the brain, so
    it holds plain values only.
    """

    request_id: str  # kvern's id (also sent back as x-kvern-request-id)
    ts_s: float  # wall-clock arrival time
    start_s: float  # monotonic arrival time, for latencies
    endpoint: str  # chat, completions, ollama_chat, ollama_generate, other
    model: str | None  # the body's model
    tenant: str | None  # keyed hash of the API key
    stream: bool  # the client asked for a stream
    upstream: str  # upstream name
    # Sent to the brain with each message about the request (so: plain values only).
    asked: bool = False  # the router asked the brain where its prefix is held
    route_reason: str | None = None  # why the router picked the first upstream
    route_attempts: int = 1  # upstreams tried
    route_load: int | None = None  # the chosen upstream's load when chosen
    route_expected_ms: float | None = None  # its expected time to first byte there
    end_user: str | None = None  # keyed hash of the body's user field


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request ended, as the relay saw it."""

    status: int | None  # the upstream's status, or kvern's own error status; None: no answer
    error: str | None  # kvern's error code (client_disconnected, upstream_timeout, ...)
    ttfb_ms: float | None  # arrival to the first relayed byte
    latency_ms: float  # arrival to the end of the answer


def _breakdown(p: Prediction, reported: int | None) -> dict[str, Any]:
    """The row's miss columns: every prompt token reused or given a reason."""
    b = assign(
        prompt_tokens=p.prompt_tokens,
        matched=p.matched_tokens,
        block_size=p.block_size or 1,
        continued=p.continued,
        reach=p.reach,
        predicted=p.predicted_cached_tokens,
        reported=reported,
        best_elsewhere=p.best_elsewhere,
    )
    d = p.divergence if b.miss_reason == "diverged" else None
    return {
        "miss_reason": b.miss_reason,
        "miss_tokens": b.miss_tokens,
        "lost_reason": b.lost_reason,
        "lost_tokens": b.lost_tokens,
        "novel_tokens": b.novel_tokens,
        "diverge_at": d.at_token if d else None,
        "diverge_place": d.place if d else None,
        "diverge_prefix": d.prefix_id if d else None,
        "diverge_before": d.before if d else None,
        "diverge_ours": d.ours if d else None,
        "diverge_theirs": d.theirs if d else None,
    }


def to_record(
    ctx: RequestContext, p: Prediction | None, facts: ResponseFacts, outcome: Outcome
) -> RequestRecord:
    """The analytics row of a finished (or failed) request; ``p`` is None if none was made."""
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
        status=outcome.status,
        error=outcome.error,
        prompt_tokens=p.prompt_tokens if p else None,
        matched_tokens=p.matched_tokens if p else None,
        matched_tokens_aligned=p.matched_tokens_aligned if p else None,
        hit=p.hit if p else None,
        tokenizer_kind=p.tokenizer_kind if p else None,
        ttfb_ms=outcome.ttfb_ms,
        latency_ms=outcome.latency_ms,
        completion_tokens=facts.completion_tokens,
        upstream_prompt_tokens=facts.upstream_prompt_tokens
        if facts.upstream_prompt_tokens is not None
        else facts.prompt_eval_count,
        reported_cached_tokens=reported,
        reported_cached_source=source,
        finish_reason=facts.finish_reason,
        predicted_cached_tokens=p.predicted_cached_tokens if p else None,
        backend_model=p.backend_model if p else None,
        block_size=p.block_size if p else None,
        route_reason=ctx.route_reason,
        route_attempts=ctx.route_attempts,
        route_load_tokens=ctx.route_load,
        route_expected_ttft_ms=ctx.route_expected_ms,
        end_user=ctx.end_user,
        **(_breakdown(p, reported) if p is not None else {}),
    )
