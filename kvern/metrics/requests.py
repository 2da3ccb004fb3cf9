"""Per-request series, fed by the same rows ``/analytics`` is computed from.

Why from the rows: every proxied request gets exactly one analytics row
(:class:`~kvern.analytics.records.RequestRecord`), made once its answer is
over and the brain has settled it. Counting the row, and not the request as
it passes, makes ``/metrics`` and ``/analytics`` agree exactly on the same
trace -- the same requests, prompt tokens, predictions and reports -- and
keeps every figure of a request together (its prediction arrives after its
last byte). Rows come back to the relay, so these live in the relay's process
whatever process did the tracking. The definitions follow
:mod:`kvern.analytics.queries`: a failed request is one with status >= 400 or
a kvern error code; latencies are over requests that did not fail; predicted
and reported cached tokens are compared over requests that have both.

The relay's own time per phase (parse, route, total) is observed here too;
the brain's phases arrive with its families at scrape time.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvern.analytics.records import RequestRecord
from kvern.config import MetricsConfig
from kvern.metrics.labels import CappedLabel
from kvern.tracking.metrics import PHASE_BUCKETS, PHASE_HELP, PHASE_METRIC

# Time to first byte (s): vLLM's time-to-first-token bucket edges, so a
# panel can put kvern's figure (which adds the proxy) beside the backend's.
TTFB_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# Whole request (s): vLLM's end-to-end latency edges, with finer ones below
# 0.3 s for short answers.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
    20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# |predicted - reported| cached tokens; the first bucket (le=0) is exact.
ERROR_BUCKETS: Final[tuple[float, ...]] = (
    0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536,
)  # fmt: skip
# matched_tokens / prompt_tokens of one request.
RATIO_BUCKETS: Final[tuple[float, ...]] = (
    0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0,
)  # fmt: skip
# The relay's phases.
RELAY_PHASES: Final[tuple[str, ...]] = ("parse", "route", "total")


def status_class(status: int | None) -> str:
    """``2xx``..``5xx``; ``none`` when no status was relayed (the client left, a cut)."""
    if status is None or not 100 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


class RequestMetrics:
    """The relay's instruments, in a registry of this app's own (never the global one)."""

    def __init__(self, config: MetricsConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._models = CappedLabel(config.max_models)
        self._tenants = CappedLabel(config.max_tenants) if config.tenant_series else None
        r = self.registry
        mu = ["model", "upstream"]
        self.requests = Counter(
            "kvern_requests",
            "Proxied requests by model, upstream, endpoint and status class (one per row)",
            ["model", "upstream", "endpoint", "status_class"],
            registry=r,
        )
        self.errors = Counter(
            "kvern_request_errors",
            "Requests that ended in a kvern error code (upstream_unreachable, "
            "upstream_timeout, client_disconnected, ...), by upstream and code",
            ["upstream", "reason"],
            registry=r,
        )
        self.duration = Histogram(
            "kvern_request_duration_seconds",
            "Arrival to last byte relayed, requests that did not fail; outcome: the "
            "prompt's prefix was a hit or a miss in kvern's trie, or uncounted",
            ["model", "upstream", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "kvern_time_to_first_byte_seconds",
            "Arrival to the upstream's first byte relayed, requests that did not fail; "
            "outcome: hit, miss or uncounted",
            ["model", "upstream", "outcome"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvern_prompt_tokens", "Prompt tokens, by kvern's own count", mu, registry=r
        )
        self.matched_tokens = Counter(
            "kvern_matched_tokens",
            "Prompt tokens already in kvern's trie (the reusable prefix it saw)",
            mu,
            registry=r,
        )
        self.lookups = Counter(
            "kvern_prefix_lookups",
            "Counted prompts whose prefix was a hit or a miss in kvern's trie",
            ["model", "upstream", "outcome"],
            registry=r,
        )
        self.predicted = Counter(
            "kvern_predicted_cached_tokens",
            "Cached prompt tokens kvern predicts the backend serves, every prediction",
            mu,
            registry=r,
        )
        self.reported = Counter(
            "kvern_reported_cached_tokens",
            "Cached prompt tokens the backend reported, every report",
            mu,
            registry=r,
        )
        self.cal_predicted = Counter(
            "kvern_calibration_predicted_tokens",
            "Predicted cached tokens over requests the backend also reported on "
            "(compare with kvern_calibration_reported_tokens_total)",
            mu,
            registry=r,
        )
        self.cal_reported = Counter(
            "kvern_calibration_reported_tokens",
            "Reported cached tokens over requests kvern also predicted",
            mu,
            registry=r,
        )
        self.predictions = Counter(
            "kvern_predictions",
            "kvern's predictions against the backend's report: exact, over, under, "
            "or unreported (the backend gave no cached figure)",
            ["model", "upstream", "outcome"],
            registry=r,
        )
        self.prediction_error = Histogram(
            "kvern_prediction_error_tokens",
            "|predicted - reported| cached tokens per request with both",
            mu,
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.match_ratio = Histogram(
            "kvern_prefix_match_ratio",
            "Share of a request's prompt tokens already in kvern's trie",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.routing = Counter(
            "kvern_routing_decisions",
            "Why the router chose the upstream it sent a request to",
            ["upstream", "reason"],
            registry=r,
        )
        self.miss_reasons = Counter(
            "kvern_cache_miss_reasons",
            "Requests by why their unreused prompt tokens were not reused: cold, below_block, "
            "diverged (prompt side); evicted, routed_away, unreported (backend side)",
            ["model", "reason"],
            registry=r,
        )
        self.miss_tokens = Counter(
            "kvern_cache_miss_tokens",
            "Prompt tokens not reused, by reason; novel: past every earlier prompt. With the "
            "reused tokens they add up to kvern_prompt_tokens_total over the tracked requests",
            ["model", "reason"],
            registry=r,
        )
        self.phase = Histogram(
            PHASE_METRIC, PHASE_HELP, ["phase"], buckets=PHASE_BUCKETS, registry=r
        )
        self._phases = {p: self.phase.labels(p) for p in RELAY_PHASES}
        self.tenant_requests: Counter | None = None
        self.tenant_prompt: Counter | None = None
        self.tenant_matched: Counter | None = None
        if self._tenants is not None:
            self.tenant_requests = Counter(
                "kvern_tenant_requests",
                "Requests per tenant (a keyed hash of the API key; capped)",
                ["tenant"],
                registry=r,
            )
            self.tenant_prompt = Counter(
                "kvern_tenant_prompt_tokens", "Prompt tokens per tenant", ["tenant"], registry=r
            )
            self.tenant_matched = Counter(
                "kvern_tenant_matched_tokens",
                "Prompt tokens already in the trie, per tenant",
                ["tenant"],
                registry=r,
            )

    def observe_phase(self, phase: str, seconds: float) -> None:
        """The relay's time in ``phase`` for one request."""
        child = self._phases.get(phase)
        if child is not None and seconds >= 0:
            child.observe(seconds)

    def observe(self, rec: RequestRecord) -> None:
        """Count one request's row; never raises into the caller's path."""
        model = self._models.value(rec.model)
        upstream = rec.upstream or "-"
        self.requests.labels(model, upstream, rec.endpoint, status_class(rec.status)).inc()
        failed = (rec.status is not None and rec.status >= 400) or rec.error is not None
        if rec.error is not None:
            self.errors.labels(upstream, rec.error).inc()
        outcome = "uncounted" if rec.hit is None else ("hit" if rec.hit else "miss")
        if not failed:
            if rec.latency_ms is not None:
                self.duration.labels(model, upstream, outcome).observe(rec.latency_ms / 1000)
            if rec.ttfb_ms is not None:
                self.ttfb.labels(model, upstream, outcome).observe(rec.ttfb_ms / 1000)
        if rec.prompt_tokens is not None:
            self.prompt_tokens.labels(model, upstream).inc(rec.prompt_tokens)
        if rec.matched_tokens is not None:
            self.matched_tokens.labels(model, upstream).inc(rec.matched_tokens)
            if rec.prompt_tokens:
                ratio = min(1.0, rec.matched_tokens / rec.prompt_tokens)
                self.match_ratio.labels(model).observe(ratio)
        if rec.hit is not None:
            self.lookups.labels(model, upstream, outcome).inc()
        self._observe_prediction(rec, model, upstream)
        for reason, tokens in (
            (rec.miss_reason, rec.miss_tokens),
            (rec.lost_reason, rec.lost_tokens),
        ):
            if reason is not None:
                self.miss_reasons.labels(model, reason).inc()
                self.miss_tokens.labels(model, reason).inc(tokens or 0)
        if rec.novel_tokens:
            self.miss_tokens.labels(model, "novel").inc(rec.novel_tokens)
        if rec.route_reason is not None:
            self.routing.labels(upstream, rec.route_reason).inc()
        if self._tenants is not None:
            self._observe_tenant(rec)

    def _observe_prediction(self, rec: RequestRecord, model: str, upstream: str) -> None:
        predicted, reported = rec.predicted_cached_tokens, rec.reported_cached_tokens
        if reported is not None:
            self.reported.labels(model, upstream).inc(reported)
        if predicted is None:
            return
        self.predicted.labels(model, upstream).inc(predicted)
        if reported is None:
            self.predictions.labels(model, upstream, "unreported").inc()
            return
        self.cal_predicted.labels(model, upstream).inc(predicted)
        self.cal_reported.labels(model, upstream).inc(reported)
        verdict = (
            "exact" if predicted == reported else ("over" if predicted > reported else "under")
        )
        self.predictions.labels(model, upstream, verdict).inc()
        self.prediction_error.labels(model, upstream).observe(abs(predicted - reported))

    def _observe_tenant(self, rec: RequestRecord) -> None:
        assert self._tenants is not None
        assert self.tenant_requests is not None
        assert self.tenant_prompt is not None and self.tenant_matched is not None
        tenant = self._tenants.value(rec.tenant)
        self.tenant_requests.labels(tenant).inc()
        self.tenant_prompt.labels(tenant).inc(rec.prompt_tokens or 0)
        self.tenant_matched.labels(tenant).inc(rec.matched_tokens or 0)
