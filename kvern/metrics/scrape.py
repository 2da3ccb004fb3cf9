"""One scrape: the relay's instruments, its live state and the brain's families, as one text.

Why merged here: kvern is two processes (the relay and the brain), and
Prometheus scrapes one port. The brain builds its own families
(:mod:`kvern.tracking.metrics`) and sends them when asked; a family both
report (``kvern_added_seconds``: the relay's phases and the brain's) becomes
one family with both sets of samples, since an exposition may name a family
once. A brain that does not answer in time costs the scrape its families
only, and ``kvern_brain_up`` says so. Text is written by prometheus-client's
own encoders (Prometheus text, or OpenMetrics when the scraper asks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from kvern.metrics.live import LiveSources, live_families
from kvern.metrics.requests import RequestMetrics
from kvern.tracking.client import BrainClient
from kvern.tracking.relay_view import BrainUnavailable

logger = logging.getLogger(__name__)

# How long a scrape waits for the brain's families (Prometheus's default
# scrape timeout is 10 s; the brain answers these ahead of its backlog).
BRAIN_TIMEOUT_S: Final = 2.0


class _Families:
    """What prometheus-client's encoders read: anything with ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name, in first-seen order; same-named families' samples joined."""
    by_name: dict[str, Metric] = {}
    for family in families:
        seen = by_name.get(family.name)
        if seen is None:
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = list(family.samples)
            by_name[family.name] = copy
        elif seen.type == family.type:
            seen.samples.extend(family.samples)
        else:
            logger.warning("metrics: %s reported as %s and %s", family.name, seen.type, family.type)
    return list(by_name.values())


async def brain_families(brain: BrainClient) -> list[Metric] | None:
    """The brain's families, or None when it is down or slow."""
    try:
        found: Any = await brain.call("metrics", timeout_s=BRAIN_TIMEOUT_S)
    except BrainUnavailable:
        return None
    if not isinstance(found, list):
        return None
    return [f for f in found if isinstance(f, Metric)]


async def scrape(
    requests: RequestMetrics,
    sources: LiveSources,
    brain: BrainClient,
    accept: str | None,
) -> tuple[bytes, str]:
    """The exposition body and its content type, for the scraper's ``Accept`` header."""
    from_brain = await brain_families(brain)
    families: list[Metric] = list(requests.registry.collect())
    families.extend(live_families(sources, brain_answered=from_brain is not None))
    if from_brain is not None:
        families.extend(from_brain)
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_Families(merge(families))), content_type
