"""Presence for every model, and the three moments a request touches it.

1. **predict** (before its prompt is inserted): the longest prefix each
   upstream holds, and what the chosen upstream should report cached;
2. **commit** (right after the insert): the chosen upstream now holds the
   prompt -- marked at once, so the next request with the same new prefix
   follows it there instead of prefilling it again elsewhere;
3. **settle** (after the answer): the upstream that really served it holds
   prompt + answer; its reported cached tokens correct the view.

Runs on the tracking thread, like everything that touches a trie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvern.routing.prefix_answer import InFlightPrefix
from kvern.routing.presence import ModelPresence, PresenceStats
from kvern.routing.presence_match import PathStep, PresenceMatch, UpstreamCache
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode


class ModelTrie(Protocol):
    """What presence needs of a model's trie (:class:`kvern.tracking.forest.ModelTrie` has it).

    A protocol, not the class: the forest also carries the cache models, a
    floor above routing, and presence only reads which model and which trie.
    """

    @property
    def model(self) -> str: ...

    @property
    def trie(self) -> RadixTrie: ...


class PresenceSource(Protocol):
    """Presence kvern does not model itself: where an upstream's prefixes are known from outside.

    Two kinds plug in (see :class:`PresenceBook`): an upstream's own KV events
    (exact; they replace the model while they are complete) and other kvern
    instances' routing (shared state; they add to what this instance saw).
    ``None``: no answer now (events lost, shared state stale) -- use the model.
    """

    def held_tokens(self, model: str, upstream: str, ids: Sequence[int]) -> int | None: ...


class ExactSource(Protocol):
    """An upstream's own KV events (:class:`kvern.tracking.kv_feed.KvFeed`): a PresenceSource
    that can also answer as of a moment.

    ``as_of_s`` (wall clock): the request's arrival. A prediction that runs
    after the engine already served the request (routing's question came too
    late, or was never asked) would otherwise count the blocks the request
    itself stored.
    """

    def held_tokens(
        self, model: str, upstream: str, ids: Sequence[int], as_of_s: float | None = None
    ) -> int | None: ...

    def caught_up_s(self, upstream: str) -> float:
        """When the upstream's latest event batch was received (wall clock; -inf: none yet)."""
        ...


@dataclass(slots=True)
class RouteHandle:
    """What a request's prediction needs at settle time (the Prediction's ``handle``)."""

    upstream: str  # where presence was predicted and marked
    predicted: int  # cached tokens predicted there
    trusted: int  # the part of it backed by finished prefills
    marks: list[PathStep] = field(default_factory=list)  # that upstream's marks on the path
    # Predicted from the upstream's own events (raised to what was routed
    # there beyond them): the model has nothing to learn from its report.
    exact: bool = False


class PresenceBook:
    """Model name -> :class:`ModelPresence`, built on a model's first request."""

    def __init__(
        self,
        caches: Sequence[UpstreamCache],
        *,
        learn: bool,
        trusted_before: Callable[[str], float],
    ) -> None:
        self.caches = {c.name: c for c in caches}
        self._learn = learn
        self._trusted_before = trusted_before
        self._models: dict[str, ModelPresence] = {}
        # upstream -> its KV events' presence; consulted before the model.
        self.exact_sources: dict[str, ExactSource] = {}
        # Other kvern instances' routing to the same upstreams (routing.shared_state).
        self.shared_source: PresenceSource | None = None

    def for_model(self, mt: ModelTrie) -> ModelPresence:
        presence = self._models.get(mt.model)
        if presence is None:
            presence = ModelPresence(mt.trie, list(self.caches.values()), learn=self._learn)
            self._models[mt.model] = presence
        return presence

    def cached(
        self,
        model: str,
        match: PresenceMatch,
        ids: Sequence[int],
        as_of_s: float | None = None,
        exclude: str | None = None,
    ) -> dict[str, int]:
        """Per upstream (but ``exclude``), the prompt tokens it should report cached.

        From the best source: an upstream's events, where they answer, are the
        truth, raised to what requests routed there are computing now (see
        :meth:`_routed_since_events`); otherwise the model, raised to what
        other instances routed there (they may have sent this prefix where
        this instance never did).
        """
        return {
            name: self._cached(name, model, match, ids, as_of_s)[0]
            for name in self.caches
            if name != exclude
        }

    def for_router(
        self, mt: ModelTrie, match: PresenceMatch, ids: Sequence[int]
    ) -> tuple[dict[str, int], dict[str, InFlightPrefix]]:
        """What the router's answer carries: :meth:`cached`, and per upstream the part in flight.

        In flight: the part of an upstream's held prefix a request routed
        there may still be computing (the router waits for it rather than
        compute it beside that request). For an upstream whose events answer,
        what they show is computed; only what was routed beyond it is not.
        """
        cached: dict[str, int] = {}
        in_flight: dict[str, InFlightPrefix] = {}
        presence = self.for_model(mt)
        for name in self.caches:
            tokens, exact, part = self._cached(name, mt.model, match, ids)
            cached[name] = tokens
            if not exact:
                part = presence.in_flight(match, name, self._trusted_before(name))
            if part is not None:
                in_flight[name] = part
        return cached, in_flight

    def _cached(
        self,
        name: str,
        model: str,
        match: PresenceMatch,
        ids: Sequence[int],
        as_of_s: float | None = None,
    ) -> tuple[int, bool, InFlightPrefix | None]:
        """Tokens ``name`` should report cached; whether its events answered; if so, the
        part routed there beyond what they show (see :meth:`_routed_since_events`)."""
        cache = self.caches[name]
        source = self.exact_sources.get(name)
        held = source.held_tokens(model, name, ids, as_of_s) if source is not None else None
        if held is not None:
            events = match.reusable(held, cache.block_size)
            part = self._routed_since_events(model, match, name)
            if part is None or part.reach <= events:
                return events, True, None
            return part.reach, True, InFlightPrefix(events, part.marked_s, part.reach)
        held = match.depth.get(name, 0)
        if self.shared_source is not None:
            held = max(held, self.shared_source.held_tokens(model, name, ids) or 0)
        return match.reusable(held, cache.block_size), False, None

    def _routed_since_events(
        self, model: str, match: PresenceMatch, name: str
    ) -> InFlightPrefix | None:
        """Of an event-fed upstream's modelled prefix, what its events cannot show yet.

        An engine publishes a block once it has computed it, so a system
        prompt routed to ``name`` a moment ago is absent from its events
        while that request prefills: read alone, they would send the next
        session of that prompt elsewhere, to compute it a second time. The
        routed marks fill that gap: a node counts while a request routed
        there by its first mark awaits a first byte, or until a batch
        arrives after it (a first byte can come before the batch that stores
        its blocks). Past that, the events alone say what is held.
        """
        presence = self._models.get(model)
        source = self.exact_sources.get(name)
        if presence is None or source is None:
            return None
        trusted_before = min(self._trusted_before(name), source.caught_up_s(name))
        return presence.in_flight(match, name, trusted_before)

    def handle(
        self,
        match: PresenceMatch,
        upstream: str,
        now_s: float,
        model: str,
        ids: Sequence[int],
        as_of_s: float | None = None,
    ) -> RouteHandle:
        """``upstream``'s prediction from ``match`` (before the request marks anything).

        ``as_of_s``: the request's arrival, for an upstream's events (see :class:`ExactSource`).
        """
        cache = self.caches.get(upstream)
        if cache is None:
            return RouteHandle(upstream, 0, 0)
        predicted, exact, _ = self._cached(upstream, model, match, ids, as_of_s)
        if exact:
            return RouteHandle(upstream, predicted, predicted, exact=True)
        trusted_before = min(self._trusted_before(upstream), now_s)
        return RouteHandle(
            upstream,
            predicted,
            min(predicted, match.trusted_cached(cache, trusted_before)),
            match.marks(upstream),
        )

    def commit(self, mt: ModelTrie, node: TrieNode, upstream: str, now_s: float) -> None:
        self.for_model(mt).mark(node, upstream, now_s, routed=True)

    def settle(
        self,
        mt: ModelTrie,
        held: TrieNode,
        handle: RouteHandle,
        served_by: str,
        reported: int | None,
        now_s: float,
    ) -> None:
        """``served_by`` holds ``held``; learn from its report when it is the predicted one."""
        presence = self.for_model(mt)
        if held.parent is not None:  # still in the trie
            presence.mark(held, served_by, now_s)
        if reported is not None and served_by == handle.upstream and not handle.exact:
            presence.correct(served_by, handle.marks, handle.trusted, handle.predicted, reported)

    def drop_upstream(self, name: str) -> None:
        for presence in self._models.values():
            presence.drop_upstream(name)

    def stats(self) -> dict[str, dict[str, PresenceStats]]:
        return {model: p.stats() for model, p in self._models.items()}
