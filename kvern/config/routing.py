"""Configuration of several upstreams and of how requests are routed among them.

Why a module of its own: ``config.yaml`` stays one schema (these sections are
fields of :class:`kvern.config.KvernConfig`), but routing has enough knobs to
crowd the core sections. One upstream stays the simple case: with no
``upstreams:`` list, the single ``upstream.base_url`` is the only one.

Load is counted in tokens, not requests: a replica busy prefilling one
30k-token prompt is more loaded than one decoding three short answers. See
:mod:`kvern.routing.policies` for how the thresholds below are used.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RoutingPolicy = Literal["round_robin", "least_load", "cache_aware", "session"]

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamEntry(_Section):
    """One replica kvern may route to."""

    # Shown in /health, analytics, errors and the x-kvern-upstream header.
    name: str
    # Base URL with its API prefix, e.g. http://10.0.0.5:8000/v1.
    url: str
    # Model names (exact or glob) this replica serves; the default serves all.
    models: list[str] = Field(default_factory=lambda: ["*"])
    # Relative capacity: load is divided by it, round robin sends this share.
    weight: float = Field(1.0, gt=0)
    # Requests kvern sends at once at most before treating the replica as
    # overloaded (it still gets requests when every replica is); 0 = no limit.
    max_concurrency: int = Field(0, ge=0)
    # Tokens of KV the replica's prefix cache holds (what kvern models as its
    # LRU budget). vLLM logs it at start ("GPU KV cache size: N tokens").
    kv_capacity_tokens: int = Field(1_000_000, ge=1)
    # The replica's KV block size: only whole blocks are reused.
    block_size: int = Field(16, ge=1)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")


class HealthConfig(_Section):
    """Active checks and the circuit breaker of each upstream."""

    # Seconds between active checks of each upstream; 0 turns them off
    # (passive marking on request errors still works).
    interval_s: float = Field(5.0, ge=0)
    timeout_s: float = Field(2.0, gt=0)
    # Path checked, relative to the upstream's URL (its /v1 prefix included).
    path: str = "/models"
    # Consecutive failures (requests or checks) that open the circuit.
    failure_threshold: int = Field(3, ge=1)
    # Seconds an open circuit waits before letting one trial request through.
    open_s: float = Field(10.0, gt=0)


class RoutingConfig(_Section):
    """How a request picks its upstream when there are several."""

    # Default: cache_aware with several upstreams (round_robin with one).
    policy: RoutingPolicy | None = None
    # session: the header carrying the session key; without it the body's
    # ``user`` field is used, and requests with neither go by least load.
    session_header: str = "x-session-id"
    # cache_aware: the prefix holder is skipped when its load is more than
    # balance_abs_tokens above the least loaded replica's AND more than
    # balance_rel times it (both, so small absolute differences never spill).
    balance_abs_tokens: int = Field(2048, ge=0)
    balance_rel: float = Field(1.5, ge=1.0)
    # A matched prefix shorter than this counts as a miss (spread by load).
    min_match_tokens: int = Field(64, ge=1)
    # Load of one running decode, in prompt-token equivalents.
    decode_load_tokens: int = Field(64, ge=0)
    # cache_aware waits this long for the prefix match; past it the request
    # goes by least load (the match still completes for analytics).
    decision_timeout_ms: float = Field(50.0, gt=0)
    # Upstream statuses that fail over to the next upstream, like a connection
    # error, as long as nothing was sent to the client yet.
    retry_on_status: list[int] = Field(default_factory=lambda: [502, 503, 504])
    # Upstreams tried per request at most (the first included).
    max_attempts: int = Field(3, ge=1)
    # Learn each upstream's real cache capacity from the cached-token figures
    # it reports (see kvern.routing.presence); off trusts kv_capacity_tokens.
    learn_capacity: bool = True
    health: HealthConfig = Field(default_factory=HealthConfig)  # type: ignore[arg-type]

    @field_validator("retry_on_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 400 <= s <= 599]
        if bad:
            raise ValueError(f"HTTP error statuses (400-599) only, not {bad}")
        return value
