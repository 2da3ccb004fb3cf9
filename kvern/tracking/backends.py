"""What each upstream said about its cache, and telling the brain when that changes.

Why: ``cache_model.kind: auto`` sizes kvern's model of each backend's cache
from what the backend says (:mod:`kvern.upstream.discovery`,
:mod:`kvern.cache_models.auto`). That is asked once at start-up, before the
brain starts with the result, and again whenever an upstream comes back
after being down: it may have restarted with other settings, and it has
surely lost its cache, so the brain's model of it starts afresh with what
the upstream says now. An upstream that could not be reached at all when
it was asked (kvern started before it) is asked again after its first
answer: otherwise ``kind: auto`` would keep the defaults until a restart.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from kvern.cache_models.auto import describe, detected_config, resolve_cache_model
from kvern.config import KvernConfig, UpstreamEntry
from kvern.tracking.client import BrainClient
from kvern.tracking.relay_view import BrainUnavailable
from kvern.upstream.client import Upstream
from kvern.upstream.discovery import BackendFacts, discover

logger = logging.getLogger(__name__)


async def discover_all(
    client: httpx.AsyncClient, entries: list[UpstreamEntry]
) -> dict[str, BackendFacts]:
    """Ask every upstream at once (each probe bounded); by upstream name."""
    origins = [Upstream.at(e.url, e.name).origin for e in entries]
    found = await asyncio.gather(*(discover(client, o) for o in origins))
    return {e.name: facts for e, facts in zip(entries, found, strict=True)}


def needs_asking(config: KvernConfig) -> bool:
    """Whether anything the upstreams could say is left unset by the configuration."""
    if config.upstream.cache_model.kind == "auto":
        return True
    return any(
        not {"block_size", "kv_capacity_tokens"} <= e.model_fields_set for e in config.upstreams
    )


class BackendWatch:
    """The facts per upstream (for /health), re-asked when an upstream comes back."""

    def __init__(
        self, config: KvernConfig, client: httpx.AsyncClient, facts: dict[str, BackendFacts]
    ) -> None:
        self._config = config  # as written: what the operator set explicitly
        self._client = client
        self.facts = facts
        self.brain: BrainClient | None = None
        self.asked = True  # False: the configuration set everything, nothing was asked
        self._tasks: set[asyncio.Task[None]] = set()
        self._asking: set[str] = set()  # upstreams being asked again now

    @classmethod
    async def start(cls, config: KvernConfig, client: httpx.AsyncClient) -> BackendWatch:
        """Ask the upstreams, unless the configuration already settles everything asked for."""
        entries = config.upstream_entries()
        facts = await discover_all(client, entries) if needs_asking(config) else {}
        watch = cls(config, client, facts)
        watch.asked = bool(facts) or not entries
        for name, line in watch.lines().items():
            logger.info("upstream %s: %s", name, line)
        return watch

    def effective(self) -> KvernConfig:
        """The configuration with what the upstreams said filled in where it is unset."""
        return detected_config(self._config, self.facts)

    def lines(self) -> dict[str, str]:
        cache_model = self._config.upstream.cache_model
        if not self.asked:
            line = describe(cache_model, None).replace(
                "upstream said nothing (not detected)", "not asked (set in config.yaml)"
            )
            return {e.name: line for e in self._config.upstream_entries()}
        return {
            name: describe(resolve_cache_model(cache_model, f), f) for name, f in self.facts.items()
        }

    def view(self) -> dict[str, Any]:
        """/health's ``backends``: per upstream, what it said and what kvern runs for it."""
        lines = self.lines()
        return {
            name: {**self.facts.get(name, BackendFacts()).to_dict(), "summary": line}
            for name, line in lines.items()
        }

    def answered(self, name: str) -> None:
        """A request to ``name`` succeeded: ask it again if it was unreachable when asked."""
        facts = self.facts.get(name)
        if facts is None or facts.kind != "unknown" or name in self._asking:
            return
        # Every probe failed to connect (one that got any answer says it is up).
        unreachable = bool(facts.errors) and all(
            e.endswith(("ConnectError", "ConnectTimeout")) for e in facts.errors
        )
        if unreachable:
            self.came_back(name)

    def came_back(self, name: str) -> None:
        """An upstream is back after being down: ask it again, then tell the brain."""
        task = asyncio.ensure_future(self._rediscover(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rediscover(self, name: str) -> None:
        if not self.asked:
            return
        entry = next((e for e in self._config.upstream_entries() if e.name == name), None)
        if entry is None:
            return
        self._asking.add(name)
        try:
            facts = await discover(self._client, Upstream.at(entry.url, entry.name).origin)
        finally:
            self._asking.discard(name)
        before = resolve_cache_model(self._config.upstream.cache_model, self.facts.get(name))
        self.facts[name] = facts
        logger.info("upstream %s is back: %s", name, self.lines()[name])
        if self.brain is None or name != self._config.upstream_entries()[0].name:
            return  # routed upstreams keep the sizes they started with (see the note in view)
        resolved = resolve_cache_model(self._config.upstream.cache_model, facts)
        if resolved == before:
            return  # same settings: what the brain models stays as it is
        try:
            await self.brain.call("reset_cache_model", resolved.model_dump(), timeout_s=5.0)
        except BrainUnavailable as exc:
            logger.warning("could not tell the brain about upstream %s: %s", name, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
