"""kvern's configuration: pydantic models for every section of ``config.yaml``.

Why pydantic with ``extra="forbid"``: a typo in a key (``max_token`` for
``max_tokens``) must stop start-up with a message naming the key, not be
silently ignored while the proxy runs with a default the user never chose.
:mod:`kvern.config.loading` turns every validation problem into one
``ConfigError`` whose message names the key path, the value and what was
expected.

Nothing here is read at import time: the caller loads the file and passes the
resulting :class:`KvernConfig` into ``create_app``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from kvern.config.observe import DiagnosisConfig, MetricsConfig
from kvern.config.routing import RoutingConfig, UpstreamEntry
from kvern.config.urls import host_port


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxyConfig(_Section):
    """The HTTP front end kvern listens on."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Request bodies larger than this are refused with a 400 before forwarding.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # How long a thread may hold the GIL before the relay's event loop gets it
    # (CPython's default is 5 ms), with ``tracking.isolation: thread``, where
    # tokenization runs beside the event loop; a shorter interval keeps it
    # from delaying relayed bytes. (The default isolation needs none.)
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=100)
    # When set, /analytics, /trie/visualize and the detailed /health need it
    # (``Authorization: Bearer <key>`` or ``x-kvern-admin-key``); a bare
    # liveness answer (``/health?live=1``, ``/livez``) stays open for probes.
    # Also from KVERN_ADMIN_KEY.
    admin_api_key: str | None = Field(None, min_length=8)
    # On SIGTERM: stop accepting, let streams run this long, then end the rest
    # with an error event (each gets its analytics row).
    shutdown_grace_s: float = Field(30.0, ge=0)
    # A client that sends headers and then stalls its body past this gets a
    # 408 and its connection back; the time between two body chunks counts.
    body_read_timeout_s: float = Field(30.0, gt=0)
    # How often ``kvern serve`` looks at its config file for an edit (mtime,
    # size, inode); normalization rules then apply live. 0: only on SIGHUP.
    config_poll_s: float = Field(1.0, ge=0)


class CacheModelConfig(_Section):
    """How the upstream's own KV cache reuses prefixes, to predict what it will report.

    ``auto`` (the default): asked of the upstream at start-up and when it
    comes back (vLLM's ``/metrics``, llama.cpp's ``/props``, SGLang's
    ``/get_server_info``, Ollama's ``/api/version``); fields set here win.
    ``radix``: one prefix cache shared by all requests, counted in whole KV
    blocks (vLLM: 16 on GPU, 128 on CPU; SGLang: 1). ``llamacpp``: llama.cpp's
    server and Ollama: ``slots`` sequences (its ``-np``), chosen by prompt
    similarity, plus the RAM prompt cache of ``--cache-ram``.
    """

    kind: Literal["auto", "radix", "llamacpp"] = "auto"
    # radix: KV block size; unset: what the upstream says (auto), else trie.block_size.
    block_size: int | None = Field(None, ge=1)
    # radix: KV tokens the backend's cache holds (vLLM: num_gpu_blocks x
    # block_size; auto reads it from vLLM's /metrics). Set, kvern replays vLLM's
    # block pool and its LRU eviction; unset, it takes the backend to hold every
    # prefix its trie holds.
    capacity_tokens: int | None = Field(None, ge=1)
    # llamacpp: number of server slots (-np) and the slot similarity threshold (-sps).
    slots: int = Field(1, ge=1)
    slot_prompt_similarity: float = Field(0.1, ge=0.0, le=1.0)
    # llamacpp: whether --cache-ram is on (the default, 8 GiB), and its size in
    # tokens: MiB * 2^20 / (2 * layers * kv_heads * head_dim * bytes per value).
    # The default, 1M tokens, is 8 GiB at 8 KiB of KV per token (a ~1B GQA
    # model); set it for your model. kvern keeps each cached sequence pinned in
    # its trie, so this also bounds kvern's own memory. null: no limit.
    cache_ram: bool = True
    cache_ram_tokens: int | None = Field(1_000_000, ge=1)
    # llamacpp: --cache-idle-slots (on by default, needs the RAM cache): each
    # task launch also saves every idle slot's sequence to the RAM cache. With
    # kv_unified (--kv-unified; llama-server's choice when -np is not given,
    # then with 4 slots) those idle slots are cleared after the save.
    cache_idle_slots: bool = True
    kv_unified: bool = False
    # Backends keep the KV of generated tokens too; kvern then adds each answer
    # (re-tokenized) to the sequence the backend holds.
    cache_generated: bool = True


class UpstreamConfig(_Section):
    """The OpenAI-compatible backend every request is forwarded to."""

    # Base URL including the API prefix, e.g. http://127.0.0.1:11434/v1 for Ollama.
    base_url: str = "http://127.0.0.1:11434/v1"
    connect_timeout_s: float = Field(5.0, gt=0)
    # Time allowed between two bytes of the upstream's answer (a slow first
    # token on a long prefill counts here, so keep it generous).
    read_timeout_s: float = Field(600.0, gt=0)
    write_timeout_s: float = Field(60.0, gt=0)
    pool_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(256, ge=1)
    max_keepalive_connections: int = Field(64, ge=0)
    # Seconds an idle kept-alive connection is reused. Below the 5 s idle
    # timeout of llama-server (cpp-httplib) and uvicorn, so kvern lets a
    # connection go before the server closes it under a new request.
    keepalive_expiry_s: float = Field(4.0, gt=0)
    # The backend's own cache, for predicting the cached tokens it reports.
    cache_model: CacheModelConfig = Field(default_factory=CacheModelConfig)  # type: ignore[arg-type]

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")


class TokenizerEntry(_Section):
    """Where one model's tokenizer comes from."""

    # A HuggingFace hub id, a local directory holding tokenizer.json, or a
    # .gguf file (the tokenizer is rebuilt from its metadata).
    source: str
    # Optional chat template: a path to a .jinja file or the template itself.
    chat_template: str | None = None


class TokenizersConfig(_Section):
    """Request model name -> tokenizer, plus the incremental tokenization cache."""

    # Keys are exact model names or glob patterns (``llama3.2:*``); the first
    # exact match wins, then the first matching pattern in file order.
    models: dict[str, TokenizerEntry] = Field(default_factory=dict)
    # Tokens of rendered segments kept per model for incremental tokenization.
    incremental_cache_tokens: int = Field(2_000_000, ge=0)
    # ...and the memory that cache may hold, the segments' text included (bytes):
    # 12 bytes a token for English text, 30 for mixed scripts, 60 for short segments.
    incremental_cache_bytes: int = Field(32 * 1024 * 1024, ge=0)
    # Share of requests on which the incremental result is checked against a
    # whole-string tokenization; a mismatch turns incremental off for the model.
    verify_sample_rate: float = Field(0.01, ge=0.0, le=1.0)
    # A sample longer than this (rendered characters) is not checked whole;
    # the next shorter prompt is, so one huge prompt costs one tokenization.
    verify_max_chars: int = Field(200_000, ge=0)
    # Compare kvern's rendering and tokenization with the upstream's own (llama.cpp's
    # /apply-template + /tokenize, vLLM's /tokenize) once per model, in the background.
    parity_check: bool = True

    @field_validator("models", mode="before")
    @classmethod
    def _plain_string_is_source(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: ({"source": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value

    def entry_for(self, model: str) -> tuple[str, TokenizerEntry] | None:
        """Return (pattern, entry) for a request's model name, or None."""
        if model in self.models:
            return model, self.models[model]
        for pattern, entry in self.models.items():
            if fnmatch.fnmatchcase(model, pattern):
                return pattern, entry
        return None


class TrieOverride(_Section):
    """Per-model trie settings that differ from the defaults."""

    max_tokens: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)


class TrieConfig(_Section):
    """The per-model radix trie of token ids."""

    # A request counts as a hit when at least this many prompt tokens match.
    min_prefix_tokens: int = Field(16, ge=1)
    # Memory cap of each model's trie, in tokens held.
    max_tokens: int = Field(4_000_000, ge=1)
    # KV-cache block size of the backend (vLLM: 16); reuse is counted in whole blocks.
    block_size: int = Field(16, ge=1)
    # Per-model overrides keyed by exact name or glob pattern.
    per_model: dict[str, TrieOverride] = Field(default_factory=dict)

    def for_model(self, model: str) -> tuple[int, int]:
        """Return (max_tokens, block_size) for a model, overrides applied."""
        max_tokens, block_size = self.max_tokens, self.block_size
        for pattern, override in self.per_model.items():
            if model == pattern or fnmatch.fnmatchcase(model, pattern):
                max_tokens = override.max_tokens or max_tokens
                block_size = override.block_size or block_size
                break
        return max_tokens, block_size


class EvictionConfig(_Section):
    """Which trie nodes go first when a model's trie is over its token budget."""

    policy: Literal["lru", "lfu", "cost_aware", "ttl"] = "cost_aware"
    # Nodes untouched for longer than this expire whatever the capacity (any policy).
    ttl_s: float | None = Field(None, gt=0)
    # Half-life of the decayed hit count used by lfu and cost_aware.
    half_life_s: float = Field(600.0, gt=0)
    # cost_aware: depth at which a token's attention cost equals its per-token cost.
    attention_tokens: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _ttl_needs_ttl_s(self) -> EvictionConfig:
        if self.policy == "ttl" and self.ttl_s is None:
            raise ValueError("policy 'ttl' needs ttl_s (seconds) to be set")
        return self


class NormalizationRule(_Section):
    """Replace every match of ``pattern`` by ``replacement`` before keying the trie."""

    pattern: str
    replacement: str
    # ``messages``: applied to each message's text before the chat template
    # renders it; ``prompt``: applied to the rendered prompt, for text the
    # template itself injects (Llama 3.x's ``Today Date: ...`` line).
    scope: Literal["messages", "prompt"] = "messages"
    # Python ``re`` flags by name, e.g. [IGNORECASE, MULTILINE].
    flags: list[Literal["IGNORECASE", "MULTILINE", "DOTALL"]] = Field(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return value


class TrackingConfig(_Section):
    """Where tracking runs and how much work one request may cost it.

    The "brain" (tokenizers, tries, cache models, presence, parity checks)
    runs in a process of its own, so tokenizing never holds the GIL the
    relay's event loop needs; ``isolation: thread`` runs it in the proxy's
    own process instead (tests, or a platform without subprocesses).
    """

    isolation: Literal["process", "thread"] = "process"
    # Requests queued to the brain; past this new requests pass untracked (counted).
    max_pending: int = Field(2048, ge=1)
    # What one backend context can hold: answers are re-tokenized (cache_generated)
    # up to this many tokens, and a prompt body over 8 bytes a token of it is
    # skipped untokenized (no backend could have cached it whole).
    max_context_tokens: int = Field(131_072, ge=1)
    # The brain answers a ping within this, or it is killed and restarted.
    hang_timeout_s: float = Field(10.0, gt=0)
    # How long /analytics and /trie/visualize wait for queued tracking to land
    # (?wait_s= overrides it per call); then they answer and say what is pending.
    drain_timeout_s: float = Field(1.0, ge=0)
    # Distinct model names tracked, each with a trie, a cache model and a
    # tokenizer entry of its own; a new name past this passes untracked
    # (counted), so a client inventing names cannot grow the brain for ever.
    max_models: int = Field(64, ge=1)
    # The live capacity curve (/analytics capacity_curve): distinct KV blocks
    # tracked per model, about 270 bytes each as they are seen (262,144: ~70 MB,
    # 4.2M tokens of 16-token blocks); capacities up to this are exact. 0: off.
    capacity_curve_max_blocks: int = Field(262_144, ge=0)
    # Model name or glob -> KV cache bytes per token, for the curve's GiB
    # (2 * layers * KV heads * head_dim * dtype bytes; Llama-3.1-8B bf16: 131072).
    capacity_curve_kv_bytes_per_token: dict[str, PositiveInt] = Field(default_factory=dict)


class CaptureConfig(_Section):
    """Forwarded request bodies appended as JSONL (OpenAI Batch input lines) for ``kvern analyze``.

    The file holds prompt text (system prompts included): it is written with
    mode 0600, and capture is off unless this section is set.
    """

    path: str
    # The file is renamed to ``<path>.1`` (the previous one replaced) before it would pass this.
    max_mb: float = Field(512.0, gt=0)


class AnalyticsConfig(_Section):
    """The asynchronous SQLite store of per-request records."""

    enabled: bool = True
    db_path: str = "kvern.db"
    # Rows per write transaction, and the longest a row waits to be written.
    batch_size: int = Field(256, ge=1)
    flush_interval_ms: int = Field(200, ge=1)
    # Rows waiting beyond this are dropped (and counted): never block a request.
    queue_size: int = Field(10_000, ge=1)
    retention_days: float = Field(30.0, gt=0)
    # Key of the HMAC that turns API keys and ``user`` fields into tenant ids.
    # None: a random secret generated once and kept beside the db
    # (``<db_path>.tenant-secret``, mode 0600). Also from KVERN_TENANT_SECRET.
    tenant_secret: str | None = Field(None, min_length=16)
    # Opt-in capture of forwarded request bodies (prompt text!); None: off.
    capture: CaptureConfig | None = None


class KvernConfig(_Section):
    """The whole ``config.yaml``."""

    proxy: ProxyConfig = Field(default_factory=ProxyConfig)  # type: ignore[arg-type]
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)  # type: ignore[arg-type]
    tokenizers: TokenizersConfig = Field(default_factory=TokenizersConfig)  # type: ignore[arg-type]
    trie: TrieConfig = Field(default_factory=TrieConfig)  # type: ignore[arg-type]
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)  # type: ignore[arg-type]
    # Model name or glob -> ordered rules; ``*`` applies to every model.
    normalization: dict[str, list[NormalizationRule]] = Field(default_factory=dict)
    analytics: AnalyticsConfig = Field(default_factory=AnalyticsConfig)  # type: ignore[arg-type]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]
    diagnosis: DiagnosisConfig = Field(default_factory=DiagnosisConfig)  # type: ignore[arg-type]
    # Several replicas to route among; empty: ``upstream.base_url`` alone.
    # Timeouts, pool limits and the cache model still come from ``upstream``.
    upstreams: list[UpstreamEntry] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _unique_upstream_names(self) -> KvernConfig:
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstream names must be unique; repeated: {dupes}")
        return self

    def upstream_entries(self) -> list[UpstreamEntry]:
        """The upstreams to route among: the list, or the one ``upstream.base_url``."""
        if self.upstreams:
            return list(self.upstreams)
        base = self.upstream.base_url
        # Built unvalidated; the name is host:port, never the URL's credentials.
        return [UpstreamEntry.model_construct(name=host_port(base), url=base)]

    def routing_policy(self) -> str:
        """The configured policy, or the default for the number of upstreams."""
        if self.routing.policy is not None:
            return self.routing.policy
        return "cache_aware" if len(self.upstreams) > 1 else "round_robin"

    def rules_for(self, model: str) -> list[NormalizationRule]:
        """Every rule whose pattern matches ``model``, in file order."""
        rules: list[NormalizationRule] = []
        for pattern, entries in self.normalization.items():
            if model == pattern or fnmatch.fnmatchcase(model, pattern):
                rules.extend(entries)
        return rules
