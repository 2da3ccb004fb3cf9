"""What the brain reports to ``/metrics``: its tries, its queue, its tokenizers, its own time.

Why the brain builds these and the relay serves them: the tries, the tracking
queue and the tokenizers live in the brain's process (see
:mod:`kvern.tracking.brain`), so only it can count them; a scrape reaches the
relay, which asks the brain for these families (a ``"metrics"`` call) and
serves them beside its own. Built with prometheus-client's metric families
and its histogram, in a registry of this brain's own (no process-wide
registry: tests run many brains in one process); the families pickle, so they
cross to the relay as they are.

A restarted brain starts its counters from zero, which Prometheus reads as a
counter reset; ``kvern_brain_restarts_total`` (the relay's) says when.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvern.tracking.forest import TrieForest
from kvern.tracking.queue import TrackerStats

# kvern's own time per request, by phase (s): parse, route and total on the
# relay's request path; render, tokenize and trie in the brain. Fine buckets:
# these are microseconds to milliseconds, and a regression shows as a shift.
PHASE_BUCKETS: Final[tuple[float, ...]] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
PHASE_METRIC: Final = "kvern_added_seconds"
PHASE_HELP: Final = (
    "kvern's own time per request by phase: parse, route and total on the request path "
    "(total: body received to the request handed to the upstream); render, tokenize and "
    "trie in the tracking process, beside the request"
)
# The brain's phases (the relay's are parse, route, total).
BRAIN_PHASES: Final[tuple[str, ...]] = ("render", "tokenize", "trie")


class BrainMetrics:
    """The brain's histograms, and the families built from its state at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._phase = Histogram(
            PHASE_METRIC,
            PHASE_HELP,
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self._phases = {phase: self._phase.labels(phase) for phase in BRAIN_PHASES}

    def observe(self, phase: str, seconds: float) -> None:
        """One request's time in ``phase`` (tracking thread; the histogram has its own lock)."""
        child = self._phases.get(phase)
        if child is not None and seconds >= 0:
            child.observe(seconds)

    def families(
        self,
        forest: TrieForest,
        stats: TrackerStats,
        backlog: int,
        tokenizer_states: Sequence[Any],
    ) -> list[Metric]:
        """Every family the brain reports, as of now (call on the tracking thread)."""
        out: list[Metric] = list(self.registry.collect())
        out.extend(_trie_families(forest))
        out.extend(_tracking_families(stats, backlog))
        out.extend(_tokenizer_families(tokenizer_states))
        return out


def _trie_families(forest: TrieForest) -> Iterable[Metric]:
    tokens = GaugeMetricFamily(
        "kvern_trie_tokens", "Token ids held in the model's trie", labels=["model"]
    )
    nodes = GaugeMetricFamily(
        "kvern_trie_nodes", "Nodes in the model's trie (the root excluded)", labels=["model"]
    )
    budget = GaugeMetricFamily(
        "kvern_trie_budget_tokens",
        "The most tokens the model's trie may hold before it evicts",
        labels=["model"],
    )
    inserts = CounterMetricFamily(
        "kvern_trie_insertions",
        "Prompts inserted into the model's trie",
        labels=["model"],
    )
    evictions = CounterMetricFamily(
        "kvern_trie_evictions",
        "Trie nodes removed to stay within budget or past their ttl, by eviction policy",
        labels=["model", "policy"],
    )
    evicted = CounterMetricFamily(
        "kvern_trie_evicted_tokens",
        "Tokens removed from the trie, by eviction policy",
        labels=["model", "policy"],
    )
    for name in forest.models():
        mt = forest.peek(name)
        if mt is None:
            continue
        policy = mt.trie.policy.name
        tokens.add_metric([name], mt.trie.num_tokens)
        nodes.add_metric([name], mt.trie.num_nodes)
        budget.add_metric([name], mt.max_tokens)
        inserts.add_metric([name], mt.insertions)
        evictions.add_metric([name, policy], mt.evicted_nodes)
        evicted.add_metric([name, policy], mt.evicted_tokens)
    return (tokens, nodes, budget, inserts, evictions, evicted)


def _tracking_families(stats: TrackerStats, backlog: int) -> Iterable[Metric]:
    queued = GaugeMetricFamily(
        "kvern_tracking_backlog",
        "Requests handed to tracking whose prediction has not run yet",
    )
    queued.add_metric([], backlog)
    tracked = CounterMetricFamily(
        "kvern_tracking_tracked", "Requests whose prompt reached the trie"
    )
    tracked.add_metric([], stats.num_tracked)
    untracked = CounterMetricFamily(
        "kvern_tracking_untracked",
        "Requests with nothing to track (no model, a body with no prompt)",
    )
    untracked.add_metric([], stats.num_untracked)
    skipped = CounterMetricFamily(
        "kvern_tracking_skipped",
        "Tracking work the brain did not do for a request, by reason",
        labels=["reason"],
    )
    if stats.num_skipped_backlog:
        skipped.add_metric(["backlog"], stats.num_skipped_backlog)
    for reason, count in sorted(stats.skipped.items()):
        skipped.add_metric([reason], count)
    errors = CounterMetricFamily(
        "kvern_tracking_errors",
        "Errors in tracking work (never a request's), by where they happened",
        labels=["reason"],
    )
    for kind, count in sorted(stats.errors.items()):
        errors.add_metric([kind], count)
    return (queued, tracked, untracked, skipped, errors)


def _tokenizer_families(states: Sequence[Any]) -> Iterable[Metric]:
    exact = GaugeMetricFamily(
        "kvern_tokenizer_exact",
        "1 when the model's own tokenizer is loaded, 0 when kvern counts with an "
        "approximate fallback (every figure of that model is then an estimate)",
        labels=["model"],
    )
    loading = GaugeMetricFamily(
        "kvern_tokenizer_loading",
        "1 while the model's tokenizer is still loading",
        labels=["model"],
    )
    for state in states:
        loading.add_metric([state.model], 1 if state.kind == "loading" else 0)
        if state.kind != "loading":
            exact.add_metric([state.model], 1 if state.kind == "exact" else 0)
    return (exact, loading)
