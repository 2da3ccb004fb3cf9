"""Divergence sites of a log: diverged requests grouped, ranked by tokens lost, memory bounded.

A site is one (model, tenant, shared prefix, place) -- as ``/analytics``
groups its rows (:mod:`kvern.analytics.misses`) -- so one cause (a request id
in a system prompt, a date the template injects) is one line however many
requests it cost. Per site the book keeps counts, the first few text windows
(the examples a rule is generalised from) and a few whole prompts (the
samples a rule is replayed over).

Why bounded, and how: a log may hold millions of requests and, with a
per-request id, as many sites. At most ``max_sites`` are counted (later new
ones only add to ``untracked``); sample text is held within
``max_sample_bytes`` together, and when it is exceeded the samples of the
half of the sites that lost the fewest tokens so far are dropped (amortised
O(1) a sample; a site that keeps losing gathers new ones).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from kvern.diagnosis.layout import actionable
from kvern.diagnosis.replay import Sample
from kvern.diagnosis.rules import Example
from kvern.diagnosis.sites import Divergence

SiteKey = tuple[str, str, str, str]  # (model, tenant, prefix_id, place)

MAX_SITES: Final[int] = 10_000
MAX_SAMPLE_BYTES: Final[int] = 64 * 1024 * 1024
EXAMPLES_PER_SITE: Final[int] = 8
SAMPLES_PER_SITE: Final[int] = 16


@dataclass(slots=True)
class Site:
    """One site's requests, tokens lost, examples and samples."""

    model: str
    tenant: str
    prefix_id: str
    place: str  # "system prompt", "message 3 (user)", "tool definitions", ...
    place_kind: str  # "system", "message", "tools", "template", "prompt"
    requests: int = 0
    tokens_lost: int = 0
    first_line: int = 0
    last_line: int = 0
    at_tokens: set[int] = field(default_factory=set)  # where its requests parted (a few)
    examples: list[Example] = field(default_factory=list)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_SITE))

    @property
    def sample_bytes(self) -> int:
        return sum(len(s.text) for s in self.samples)


@dataclass(slots=True)
class SiteBook:
    """The sites of one pass."""

    max_sites: int = MAX_SITES
    max_sample_bytes: int = MAX_SAMPLE_BYTES
    sites: dict[SiteKey, Site] = field(default_factory=dict)
    untracked_requests: int = 0  # diverged at a site past max_sites
    untracked_tokens: int = 0
    sample_bytes: int = 0

    def add(
        self,
        model: str,
        tenant: str,
        found: Divergence,
        sample: Sample | None,
        tokens_lost: int,
        line_no: int,
    ) -> None:
        key = (model, tenant, found.prefix_id, found.place)
        site = self.sites.get(key)
        if site is None:
            if len(self.sites) >= self.max_sites:
                self.untracked_requests += 1
                self.untracked_tokens += tokens_lost
                return
            site = self.sites[key] = Site(
                model, tenant, found.prefix_id, found.place, found.place_kind, first_line=line_no
            )
        site.requests += 1
        site.tokens_lost += tokens_lost
        site.last_line = line_no
        if len(site.at_tokens) < 8:
            site.at_tokens.add(found.at_token)
        if len(site.examples) < EXAMPLES_PER_SITE and (found.ours or found.theirs):
            site.examples.append(Example(found.before, found.ours, found.theirs))
        if sample is not None:
            if len(site.samples) == site.samples.maxlen:
                self.sample_bytes -= len(site.samples[0].text)
            site.samples.append(sample)
            self.sample_bytes += len(sample.text)
            if self.sample_bytes > self.max_sample_bytes:
                self._shed()

    def _shed(self) -> None:
        """Drop the samples of the half of the sampled sites that lost the fewest tokens."""
        sampled = sorted((s for s in self.sites.values() if s.samples), key=lambda s: s.tokens_lost)
        for site in sampled[: max(1, len(sampled) // 2)]:
            self.sample_bytes -= site.sample_bytes
            site.samples.clear()

    def ranked(self) -> list[Site]:
        """Every site, the costliest first (then the most requests, then the earliest).

        Sites in a request's last message come after the others, as in /analytics.
        """
        return sorted(
            self.sites.values(),
            key=lambda s: (not actionable(s.place), -s.tokens_lost, -s.requests, s.first_line),
        )

    def check_invariants(self) -> None:
        """Recount what is kept incrementally (tests)."""
        assert self.sample_bytes == sum(s.sample_bytes for s in self.sites.values())
        assert len(self.sites) <= self.max_sites
