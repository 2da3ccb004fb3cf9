"""What one request teaches a model's trie, cache model and presence: predict, then settle.

Why apart from the tracker: :class:`~kvern.tracking.tracker.Tracker` decides
*when* work runs and in which order (jobs, tokenizer loads, the backlog);
this is *what* the work does, on the tracking thread only, synchronously and
with no I/O -- the part the truth tests check request by request. Before the
answer: predict what the backend will report cached (its cache model, or the
presence of the upstream it went to), insert the prompt and lock it. After:
the backend holds prompt + answer; tell the cache model or presence, unlock.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvern.config import KvernConfig
from kvern.prompt.requests import plain_text
from kvern.routing.book import PresenceBook, RouteHandle
from kvern.routing.presence_match import PresenceMatch
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.tracking.divergence import DivergenceFinder, Finding
from kvern.tracking.forest import TrieForest
from kvern.tracking.queue import TrackerStats
from kvern.tracking.records import Prediction
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode
from kvern.upstream.usage import ResponseFacts

# Characters of answer text per token, at most, that are re-tokenized.
_ANSWER_CHARS_PER_TOKEN = 8


@dataclass(frozen=True, slots=True)
class Served:
    """Which upstream answered a request in the end (after any failover), and whether it did."""

    upstream: str
    ok: bool


class PresenceFeed(Protocol):
    """Where this instance's routing goes for other kvern instances (``routing.shared_state``).

    :class:`kvern.tracking.shared_presence.SharedPresence` is one; ``publish``
    only queues, so the tracking thread never waits on the store.
    """

    def publish(self, model: str, upstream: str, ids: Sequence[int]) -> None: ...


class Bookkeeper:
    """Predicts and settles requests against each model's trie (tracking thread only)."""

    def __init__(
        self,
        config: KvernConfig,
        forest: TrieForest,
        presence: PresenceBook | None,
        stats: TrackerStats,
        clock: Callable[[], float] = time.time,
        shared: PresenceFeed | None = None,
    ) -> None:
        self._config = config
        self._forest = forest
        self.presence = presence
        self._shared = shared  # told each commit and settle, for other instances
        self._stats = stats
        self._clock = clock
        self._max_answer_tokens = config.tracking.max_context_tokens
        self.divergence = DivergenceFinder(config.diagnosis)

    def predict(
        self,
        tok: ModelTokenizer,
        model: str,
        prompt: PromptTokens,
        insert: bool,
        upstream: str,
        arrived_s: float | None = None,
    ) -> Prediction:
        """Predict, insert and lock ``prompt`` as served by ``upstream``.

        ``arrived_s``: the request's arrival (wall clock), what an upstream's
        events are read as of: the prediction may run after it was served.
        """
        mt = self._forest.get(model)
        now = self._clock()
        node: TrieNode | None = None
        predicted: int | None = None
        handle: Any = None
        finding = Finding(False, 0)
        best_elsewhere = 0
        backend_model, block_size = mt.cache_model.name, mt.cache_model.block_size
        if not insert:
            matched = mt.trie.match(prompt.ids).matched_tokens
        else:
            # Predict first: the trie must not yet hold this prompt.
            if self.presence is not None and upstream in self.presence.caches:
                match: PresenceMatch = self.presence.for_model(mt).match(prompt.ids)
                handle = self.presence.handle(match, upstream, now, model, prompt.ids, arrived_s)
                predicted = handle.predicted
                # The others only: the chosen upstream's sources were just asked.
                elsewhere = self.presence.cached(model, match, prompt.ids, arrived_s, upstream)
                best_elsewhere = max(elsewhere.values(), default=0)
                backend_model = "events" if handle.exact else "routed"  # which presence
                block_size = self.presence.caches[upstream].block_size
            else:
                start = mt.cache_model.start(mt.trie, prompt.ids, now)
                predicted, handle = start.predicted_cached_tokens, start.handle
            result = mt.trie.insert(prompt.ids, now)
            mt.trie.lock(result.node)
            finding = self.divergence.find(tok, prompt, result)
            if self.presence is not None and upstream in self.presence.caches:
                self.presence.commit(mt, result.node, upstream, now)
                if self._shared is not None:
                    self._shared.publish(model, upstream, prompt.ids)
            mt.insertions += 1
            nodes_before = mt.trie.num_nodes
            mt.evicted_tokens += mt.trie.maintain(mt.max_tokens, now)
            mt.evicted_nodes += max(0, nodes_before - mt.trie.num_nodes)
            matched, node = result.matched_tokens, result.node
        self._stats.num_tracked += 1
        return Prediction(
            prompt_tokens=len(prompt.ids),
            matched_tokens=matched,
            matched_tokens_aligned=RadixTrie.aligned(matched, mt.block_size),
            hit=matched >= self._config.trie.min_prefix_tokens,
            tokenizer_kind=prompt.kind,
            node=node,
            predicted_cached_tokens=predicted,
            backend_model=backend_model,
            block_size=block_size,
            ids=prompt.ids if insert else None,
            tokenizer=tok,
            handle=handle,
            continued=finding.continued,
            reach=finding.reach,
            best_elsewhere=best_elsewhere,
            divergence=finding.divergence,
        )

    def settle(self, model: str, p: Prediction, facts: ResponseFacts, served: Served) -> None:
        """After the answer: the backend now holds prompt + answer; tell the cache model.

        However a step fails, the cache model hears of the end (a llama.cpp
        slot is freed) and the prompt's lock is released: a lock left behind
        pins its path in the trie for ever.
        """
        mt = self._forest.peek(model)
        if mt is None or p.node is None:
            return  # nothing was inserted (a failed request): nothing to settle
        held = p.node
        now = self._clock()
        full: array[int] | None = None
        try:
            gen = self.generated_ids(p, facts) if served.ok else None
            if gen is not None and p.ids is not None:
                full = array("i", p.ids)
                full.extend(gen)
                held = mt.trie.insert(full, now, count_hit=False).node
        finally:
            try:
                if isinstance(p.handle, RouteHandle) and self.presence is not None:
                    if served.ok:
                        reported = facts.reported_cached_tokens
                        self.presence.settle(mt, held, p.handle, served.upstream, reported, now)
                        shown = full if full is not None else p.ids
                        if self._shared is not None and shown is not None:
                            self._shared.publish(model, served.upstream, shown)
                else:
                    mt.cache_model.finish(mt.trie, p.handle, held, now)
            finally:
                mt.trie.unlock(p.node)
                p.ids = None  # drop the prompt's ids now

    def generated_ids(self, p: Prediction, facts: ResponseFacts) -> array[int] | None:
        """The answer's tokens the backend fed back through the model (all but the last).

        The backend holds the ids it sampled; kvern sees their text, so the
        answer is re-tokenized -- exact for the usual canonical output. Bounded
        by one backend context: beyond it no backend holds the sequence whole.
        """
        if not self._config.upstream.cache_model.cache_generated or p.tokenizer is None:
            return None
        # A lone surrogate (JSON may escape one) is U+FFFD here: the tokenizer
        # refuses a str no UTF-8 encoder accepts.
        text = plain_text(facts.completion_text)
        if not text:
            return None
        limit = self._max_answer_tokens
        if len(text) > limit * _ANSWER_CHARS_PER_TOKEN:
            text = text[: limit * _ANSWER_CHARS_PER_TOKEN]
            self._stats.skip("answer_over_context")
        gen = p.tokenizer.encode_text(text)[:limit]
        evaluated = (facts.completion_tokens or len(gen)) - 1
        return gen[: max(0, min(evaluated, len(gen)))] or None
