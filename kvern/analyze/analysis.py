"""A whole analysis: the log once with everything counted, advice for its top sites, the what-ifs.

Why in this order: the sites worth a rule are only known after the first
pass, and each rule's worth only after a pass with it; the first pass
keeps the few prompts per site the advice replays
(:func:`kvern.diagnosis.advice.advise`, the same call ``/analytics`` makes
for live traffic), so a site's measured saving and the log-wide what-if are
two views of one rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvern.analyze.log import LogFile
from kvern.analyze.passes import OnProgress, PassResult, run_pass
from kvern.analyze.setup import Setup
from kvern.analyze.sitebook import Site
from kvern.analyze.whatif import Candidate, candidates, run_what_ifs
from kvern.diagnosis.advice import Advice, advise

# Told each pass's label; hands back that pass's progress callback, if any.
OnPass = Callable[[str], OnProgress | None]


@dataclass(slots=True)
class SiteAdvice:
    """One of the top sites and what to do about it."""

    rank: int  # 1-based, by tokens lost
    site: Site
    advice: Advice


@dataclass(slots=True)
class Analysis:
    """Everything a report is made of."""

    log: LogFile
    setup: Setup
    base: PassResult
    sites: list[SiteAdvice] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    per_rule: list[PassResult] = field(default_factory=list)  # one per candidate, in order
    together: PassResult | None = None  # all candidates at once (two or more)
    elapsed_s: float = 0.0


def advise_site(setup: Setup, base: PassResult, site: Site) -> Advice:
    state = base.models[site.model]
    return advise(
        site.examples,
        list(site.samples),
        place_kind=site.place_kind,
        tokenize=state.tokenizer.encode_text,
        block_size=state.block_size,
    )


def analyze(
    log: LogFile, setup: Setup, *, on_pass: OnPass | None = None, what_if: bool = True
) -> Analysis:
    """Run the analysis of ``log`` (``what_if`` False: skip the passes with the rules)."""
    started = time.perf_counter()
    progress = on_pass("log") if on_pass is not None else None
    base = run_pass(log, setup, setup.rules, full=True, on_progress=progress)
    out = Analysis(log, setup, base)
    assert base.sites is not None
    for rank, site in enumerate(base.sites.ranked()[: setup.options.top], 1):
        out.sites.append(SiteAdvice(rank, site, advise_site(setup, base, site)))
    out.candidates = candidates(
        [
            (s.rank, s.site.model, s.advice.rule.as_config() if s.advice.rule else None)
            for s in out.sites
        ]
    )
    if what_if and out.candidates:
        out.per_rule, out.together = run_what_ifs(log, setup, out.candidates, on_pass=on_pass)
    out.elapsed_s = time.perf_counter() - started
    return out
