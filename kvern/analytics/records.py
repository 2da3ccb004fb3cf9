"""One analytics row per proxied request, and its mapping to a SQLite row.

Why a flat record of plain values: the request path builds it once, hands it to
:meth:`kvern.analytics.store.AnalyticsStore.record` and forgets it; the writer
turns a whole batch into tuples for one ``executemany``. Nothing in it refers
to a live object (no request, no trie node), so a queued record keeps nothing
else alive, and nothing in it is an API key. Of the prompt it holds only the
short windows around a divergence (``diagnosis.window_chars``; 0 keeps none).

Why ``kw_only``: the figures a request learns late (status, latency, usage) all
default to None, so the proxy can fill in what it knows without positional
slots drifting when a later migration adds a field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final, TypeAlias

from kvern.prompt.requests import plain_text

# A value the sqlite3 module binds as is.
SqlValue: TypeAlias = "str | int | float | None"

# Columns declared NOT NULL; a None here would fail the whole batch's insert,
# so :func:`to_row` refuses it for the one record instead.
REQUIRED_COLUMNS: Final[frozenset[str]] = frozenset(
    {"request_id", "ts_s", "model", "endpoint", "upstream", "stream"}
)

# Columns stored as INTEGER 0/1 and read back as bool.
BOOL_COLUMNS: Final[frozenset[str]] = frozenset({"stream", "hit"})

# The endpoint kinds the proxy reports.
ENDPOINTS: Final[tuple[str, ...]] = (
    "chat",
    "completions",
    "ollama_chat",
    "ollama_generate",
    "other",
)


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """What kvern predicted and what the upstream did, for one proxied request."""

    # kvern's id for the request (also sent upstream / in logs).
    request_id: str
    # Unix time the request arrived at kvern (s).
    ts_s: float
    # The model name as the client asked for it.
    model: str
    # A keyed hash of the API key, computed by the caller; never the key
    # itself. None when the request carried none.
    tenant: str | None = None
    # Which API was called: one of ENDPOINTS.
    endpoint: str
    # The upstream that served it: its configured name or base URL.
    upstream: str
    # Whether the client asked for a streamed response.
    stream: bool
    # HTTP status relayed to the client; None when no upstream status arrived.
    status: int | None = None
    # kvern's error code ("upstream_unreachable", "upstream_timeout",
    # "client_disconnected", ...); None when the request completed.
    error: str | None = None
    # kvern's own token count of the rendered prompt.
    prompt_tokens: int | None = None
    # Prompt tokens already in kvern's trie: the predicted reusable prefix.
    matched_tokens: int | None = None
    # matched_tokens rounded down to the backend's KV block size.
    matched_tokens_aligned: int | None = None
    # matched_tokens >= min_prefix_tokens; None when the prompt was not counted.
    hit: bool | None = None
    # How the prompt was tokenized: "exact" or "fallback".
    tokenizer_kind: str | None = None
    # Time to the first byte from the upstream, as relayed (ms).
    ttfb_ms: float | None = None
    # Time from arrival to the last byte relayed (ms).
    latency_ms: float | None = None
    # Completion tokens, as reported by the backend.
    completion_tokens: int | None = None
    # usage.prompt_tokens as reported by the backend.
    upstream_prompt_tokens: int | None = None
    # The backend's own cached-prompt figure (cached_tokens, cache_n, ...).
    reported_cached_tokens: int | None = None
    # Which field reported_cached_tokens came from, e.g.
    # "usage.prompt_tokens_details.cached_tokens" or "timings.cache_n".
    reported_cached_source: str | None = None
    # The backend's finish_reason for the (first) choice.
    finish_reason: str | None = None
    # Cached tokens kvern predicts the backend reports, by its model of that
    # backend's cache (slots, blocks, the last token always recomputed).
    predicted_cached_tokens: int | None = None
    # Which backend cache model made that prediction (e.g. "llamacpp", "radix").
    backend_model: str | None = None
    # KV block size the prediction was counted in.
    block_size: int | None = None
    # Why the router chose the first upstream: "prefix", "miss",
    # "prefix_overloaded", "least_load", "round_robin", "session", ...
    route_reason: str | None = None
    # Upstreams tried (1 unless it failed over before relaying anything).
    route_attempts: int | None = None
    # The chosen upstream's load when chosen (prompt-token equivalents).
    route_load_tokens: int | None = None
    # A keyed hash of the body's ``user`` field (the end user within a
    # tenant); None when the body had none.
    end_user: str | None = None
    # Why the prompt tokens not reused were not (kvern.diagnosis.reasons):
    # prompt_tokens = reused + lost_tokens + miss_tokens + novel_tokens.
    # The prompt side: cold, below_block or diverged, and its tokens.
    miss_reason: str | None = None
    miss_tokens: int | None = None
    # The backend side: evicted, routed_away or unreported, and its tokens.
    lost_reason: str | None = None
    lost_tokens: int | None = None
    # Past every earlier prompt: nothing could have been reused.
    novel_tokens: int | None = None
    # A divergence: its token, where it falls ("message 3 (user)"), a hash of
    # the shared ids before it (the site), and text windows around it
    # (diagnosis.window_chars; empty when text is not kept).
    diverge_at: int | None = None
    diverge_place: str | None = None
    diverge_prefix: str | None = None
    diverge_before: str | None = None
    diverge_ours: str | None = None
    diverge_theirs: str | None = None
    # The router's expected time to first byte there (cache_aware, ms, by the
    # upstream's learned TTFT line); beside ttfb_ms it shows the model's error.
    route_expected_ttft_ms: float | None = None


# The analytics column names, in table and row-tuple order: the record's fields.
COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in fields(RequestRecord))


def to_row(rec: RequestRecord) -> tuple[SqlValue, ...]:
    """The record as a row tuple in COLUMNS order, booleans as 0/1.

    Checks every value is something sqlite3 can bind and that NOT NULL columns
    are set, raising ``TypeError`` naming the field: one bad record must be
    refused alone rather than fail the ``executemany`` of its whole batch.
    """
    values = [getattr(rec, name) for name in COLUMNS]
    for index, (name, value) in enumerate(zip(COLUMNS, values, strict=True)):
        if value is None:
            if name in REQUIRED_COLUMNS:
                raise TypeError(f"RequestRecord.{name} must not be None")
        elif isinstance(value, bool):
            values[index] = int(value)
        elif isinstance(value, int):
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise TypeError(f"RequestRecord.{name} = {value} is outside SQLite's integers")
        elif isinstance(value, str):
            values[index] = plain_text(value)  # SQLite stores UTF-8 only
        elif not isinstance(value, float):
            raise TypeError(f"RequestRecord.{name} has unsupported type {type(value).__name__}")
    return tuple(values)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1



def from_row(row: tuple[SqlValue, ...]) -> RequestRecord:
    """Rebuild a record from a row selected as ``SELECT <COLUMNS> FROM requests``."""
    if len(row) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} columns, got {len(row)}")
    values: dict[str, object] = {}
    for name, value in zip(COLUMNS, row, strict=True):
        values[name] = bool(value) if name in BOOL_COLUMNS and value is not None else value
    return RequestRecord(**values)  # type: ignore[arg-type]
