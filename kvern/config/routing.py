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

import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

RoutingPolicy = Literal["round_robin", "least_load", "cache_aware", "session"]

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# What vLLM's publisher binds or connects: tcp://host:port (host may be *) or ipc://path.
_ZMQ_ENDPOINT = re.compile(r"^(tcp://(\*|[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}|ipc://\S+)$")


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
    # vLLM's KV cache events (``--kv-events-config``, publisher zmq): where its
    # ZeroMQ PUB is, tcp://host:port (``*`` as host, as vLLM binds it, means
    # this upstream's own host) or ipc://path. kvern then knows this replica's
    # prefix cache from its events instead of modelling it (see
    # kvern.tracking.kv_feed). "auto": ask vLLM (/server_info, which vLLM
    # serves only with VLLM_SERVER_DEV_MODE=1). None: modelled.
    kv_events: str | None = None
    # Its replay ROUTER (vLLM's replay_endpoint), asked for missed batches; without
    # one a lost batch makes this replica's presence fall back to the model.
    kv_events_replay: str | None = None
    # The topic vLLM publishes under (its ``topic``; "" by default).
    kv_events_topic: str = ""

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

    @field_validator("kv_events", "kv_events_replay")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or _ZMQ_ENDPOINT.match(value):
            return value
        raise ValueError("expected tcp://host:port (host may be *), ipc://path or auto")

    @model_validator(mode="after")
    def _events_together(self) -> UpstreamEntry:
        if self.kv_events_replay == "auto":
            raise ValueError("kv_events_replay: auto is not a ZeroMQ endpoint; set kv_events: auto")
        fixed = self.kv_events is not None and self.kv_events != "auto"
        if not fixed and (self.kv_events_replay is not None or self.kv_events_topic):
            raise ValueError(
                "kv_events_replay and kv_events_topic need kv_events set to an endpoint "
                "(with kv_events: auto they are read from vLLM)"
            )
        return self


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
    # cache_aware goes where the first token is expected soonest (queue wait +
    # uncached prefill; see kvern.routing.policies). Computing a prefix another
    # upstream holds also costs its copy: the duplicated tokens times how full
    # the cache is, times this weight (0: judge by this request's TTFT alone).
    spill_reuse_weight: float = Field(8.0, ge=0)
    # A prefix at least this many requests a second go through (a tenant's
    # system prompt) is hot: while held by fewer than hot_prefix_replicas
    # upstreams, all queued, a request goes to a replica with a shorter queue
    # to start a copy there (0 replicas: never on purpose).
    hot_prefix_per_s: float = Field(3.0, ge=0)
    hot_prefix_replicas: int = Field(2, ge=0)
    # cache_aware: a request whose prefix its chosen upstream is still
    # computing for an earlier request (routed there moments ago, no first
    # byte yet) waits for that first byte -- at most this long, and at most
    # twice that prefill's expected time -- instead of computing the same
    # prefix alongside it; it then reuses it (0: never waits).
    in_flight_wait_ms: float = Field(1000.0, ge=0)
    # Replaced by the rule above; still accepted (and ignored, with a warning
    # at start) so that an older config.yaml keeps loading.
    balance_abs_tokens: int | None = Field(None, ge=0)
    balance_rel: float | None = Field(None, ge=1.0)
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
    # Several kvern instances in front of the same upstreams route as one by
    # sharing their load and modelled presence through Redis or Valkey
    # (redis://host:port/db; needs ``pip install 'kvern[redis]'``). Upstreams
    # are matched by name, so every instance must name them alike. Off: None.
    shared_state: str | None = None
    # Keys and the stream live under this prefix (one fleet per prefix).
    shared_state_prefix: str = Field("kvern", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # Deadline of every Redis round trip (connect, read, write); past it the
    # link counts an error and reconnects with backoff.
    shared_state_timeout_ms: float = Field(250.0, gt=0)
    # How often each instance publishes its load and reads the others'.
    shared_state_publish_ms: float = Field(100.0, gt=0)
    # The others' load older than this is ignored: decisions fall back to
    # this instance's own load (counted as fail_open in /health and /metrics).
    shared_state_stale_ms: float = Field(1000.0, gt=0)
    # Entries kept in the presence stream (XADD MAXLEN ~): what a new or
    # restarted instance reads back to learn where prefixes went.
    shared_state_stream_maxlen: int = Field(10_000, ge=1)
    health: HealthConfig = Field(default_factory=HealthConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _retired(self) -> RoutingConfig:
        retired = [n for n in ("balance_abs_tokens", "balance_rel") if getattr(self, n) is not None]
        if retired:
            logger.warning(
                "routing.%s no longer does anything: cache_aware spills by expected time to "
                "first token (see routing.spill_reuse_weight); remove it from the config",
                " and routing.".join(retired),
            )
        return self

    @model_validator(mode="after")
    def _shared_state_timing(self) -> RoutingConfig:
        # A copy refreshed less often than it goes stale would always be ignored.
        if self.shared_state_publish_ms * 2 > self.shared_state_stale_ms:
            raise ValueError(
                f"routing.shared_state_stale_ms ({self.shared_state_stale_ms:g}) must be at "
                f"least twice shared_state_publish_ms ({self.shared_state_publish_ms:g})"
            )
        return self

    @field_validator("shared_state")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(rediss?|unix)://\S+$", value):
            raise ValueError("expected a redis://host:port/db (or rediss://, unix://) URL")
        return value

    @field_validator("retry_on_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 400 <= s <= 599]
        if bad:
            raise ValueError(f"HTTP error statuses (400-599) only, not {bad}")
        return value
