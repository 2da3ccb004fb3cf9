"""Which upstream holds which prefix: per-node presence in one model's trie, LRU per upstream.

Why on the trie: kvern already keeps every prompt of a model in a radix trie
of token ids. Each node records, in ``node.upstreams``, the upstreams that
hold its prefix and when each last used it. A request's longest prefix on each
upstream is then one walk down the path it shares with earlier requests.

Why LRU per upstream, within that upstream's own token budget: each replica
evicts from its own cache when it fills (vLLM: LRU over free blocks), so
kvern's view must decay the same way, or the router keeps sending requests to
a replica for a prefix that replica dropped long ago (SGLang's router never
learns this). Marks are made leaf first, then each ancestor, and every mark of
a node marks all its ancestors at the same time, so an ancestor is never
older than its descendants and the LRU always drops tails before the prefixes
they hang from; presence stays closed under "ancestor of".

Why learn from reported cached tokens: the configured capacity is a guess (and
generated tokens, other routers and restarts change what a replica holds). A
request predicted to hit ``p`` tokens that the replica reports as ``r < p`` is
proof that the replica evicted the node at depth ``r``; with LRU on both sides,
everything kvern saw as older than that node is gone too. Those marks are
dropped and the budget is pulled toward what remains. A report above the
prediction grows the budget. Only marks made by requests whose prefill had
finished count as proof (a concurrent request may still be computing the
prefix), see ``trusted_before`` in :meth:`ModelPresence.match`.

Everything here runs on the tracking thread, which owns the trie.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvern.routing.prefix_answer import InFlightPrefix
from kvern.routing.presence_match import PathStep, PresenceMatch, UpstreamCache
from kvern.trie import RadixTrie
from kvern.trie.node import TrieNode

# The learned budget never drops below this share of the configured capacity
# nor grows above this multiple of it.
_MIN_BUDGET_SHARE = 1 / 16
_MAX_BUDGET_FACTOR = 4.0
# A report this many blocks below the prediction proves an eviction.
_PROOF_BLOCKS = 4
# How far the budget moves toward each new capacity estimate.
_LEARN_RATE = 0.25
# First-mark times kept per upstream at most (the oldest go first: they are
# the likeliest to be computed by now).
_MAX_FRESH = 65_536


@dataclass(slots=True)
class PresenceStats:
    """Counters for /health and analytics, per upstream and model."""

    tokens: int = 0  # tokens kvern sees the upstream holding
    budget: float = 0.0  # its (learned) capacity in tokens
    evicted_tokens: int = 0  # dropped by the LRU budget
    corrected_tokens: int = 0  # dropped because a report proved them gone
    confirmed_misses: int = 0  # reports below a trusted prediction
    unexpected_hits: int = 0  # reports above the prediction


class _UpstreamLRU:
    """One upstream's held nodes, least recently used first, within a token budget."""

    def __init__(self, cache: UpstreamCache) -> None:
        self.cache = cache
        self.nodes: OrderedDict[TrieNode, None] = OrderedDict()
        self.stats = PresenceStats(budget=float(cache.capacity_tokens))
        self.assigned = 0  # tokens newly marked here, ever (PresenceMatch.assigned)
        # Nodes newly marked here, with when (oldest first): until every
        # request routed here by then has its first byte, the request that
        # marked one may still be computing it (see ModelPresence.in_flight).
        self.fresh: OrderedDict[TrieNode, float] = OrderedDict()

    def forget(self, node: TrieNode) -> None:
        """Drop the mark on ``node`` (it must be held)."""
        del self.nodes[node]
        self.fresh.pop(node, None)
        assert node.upstreams is not None
        node.upstreams.pop(self.cache.name, None)
        self.stats.tokens -= len(node.key)

    def fit(self) -> None:
        """Drop least recently used marks until within budget."""
        while self.stats.tokens > self.stats.budget and self.nodes:
            node = next(iter(self.nodes))
            self.stats.evicted_tokens += len(node.key)
            self.forget(node)


class ModelPresence:
    """Per-upstream presence on one model's trie; the trie's listener."""

    def __init__(
        self,
        trie: RadixTrie,
        caches: list[UpstreamCache],
        *,
        learn: bool = True,
        proof_blocks: int = _PROOF_BLOCKS,
    ) -> None:
        self.trie = trie
        self.caches = {c.name: c for c in caches}
        self.learn = learn
        self.proof_blocks = proof_blocks
        self._lru = {c.name: _UpstreamLRU(c) for c in caches}
        self._latest_s = float("-inf")
        trie.listener = self

    def stats(self) -> dict[str, PresenceStats]:
        return {name: lru.stats for name, lru in self._lru.items()}

    # -- reading ------------------------------------------------------------

    def match(self, ids: list[int] | object) -> PresenceMatch:
        """Walk the prompt's path once; per upstream, the contiguous held prefix."""
        result = self.trie.match(ids)  # type: ignore[arg-type]
        num_tokens = len(ids)  # type: ignore[arg-type]
        chain: list[TrieNode] = []
        walk: TrieNode | None = result.node
        while walk is not None and walk is not self.trie.root:
            chain.append(walk)
            walk = walk.parent
        chain.reverse()
        path: list[PathStep] = []
        depth: dict[str, int] = {}
        alive = set(self._lru)
        for node in chain:
            end = min(node.depth, result.matched_tokens)
            held = node.upstreams or {}
            path.append(PathStep(node, end, None))
            alive &= held.keys()
            for name in alive:
                depth[name] = end
            if not alive and end >= result.matched_tokens:
                break
        fill = {n: lru.stats.tokens / max(lru.stats.budget, 1.0) for n, lru in self._lru.items()}
        assigned = {n: lru.assigned for n, lru in self._lru.items()}
        return PresenceMatch(num_tokens, depth, path, fill, assigned)

    def in_flight(
        self, match: PresenceMatch, name: str, trusted_before: float
    ) -> InFlightPrefix | None:
        """The part of ``name``'s held prefix a request routed there may still be computing.

        ``trusted_before``: when the oldest request there still awaiting its
        first byte was routed; a node first marked before that is computed.
        None when all of the held prefix is; else the tokens held up to the
        first node that may not be, the newest first mark on the rest
        (computed once no request routed there by then awaits a first byte),
        and the end of the deepest such node (what those requests compute).
        Each node is judged once past ``trusted_before`` and forgotten: the
        bound must only grow.
        """
        lru = self._lru.get(name)
        if lru is None:
            return None
        fresh = lru.fresh
        while fresh:
            node, first_s = next(iter(fresh.items()))
            if first_s >= trusted_before:
                break
            del fresh[node]
        held = match.depth.get(name, 0)
        settled: int | None = None
        reach = 0
        newest = float("-inf")
        start = 0
        for step in match.path:
            if start >= held:
                break
            marked_s = fresh.get(step.node)
            # (A split appends a copied older time out of order: judged here too.)
            if marked_s is not None and marked_s >= trusted_before:
                if settled is None:
                    settled = start
                newest = max(newest, marked_s)
                reach = min(step.end_depth, held)
            start = step.end_depth
        if settled is None:
            return None
        size = self.caches[name].block_size
        return InFlightPrefix(match.reusable(settled, size), newest, match.reusable(reach, size))

    # -- writing -------------------------------------------------------------

    def mark(self, node: TrieNode, name: str, now_s: float, routed: bool = False) -> None:
        """``name`` now holds the prefix ending at ``node`` (and every ancestor).

        ``routed``: marked as a request is sent there, before it computed
        anything -- the nodes it newly marks are in flight until its first
        byte (see :meth:`in_flight`); otherwise (an answered request) held.
        """
        lru = self._lru.get(name)
        if lru is None:
            return
        now_s = max(now_s, self._latest_s)
        self._latest_s = now_s
        walk: TrieNode | None = node
        root = self.trie.root
        while walk is not None and walk is not root:
            if walk.upstreams is None:
                walk.upstreams = {}
            if name not in walk.upstreams:
                lru.stats.tokens += len(walk.key)
                lru.assigned += len(walk.key)
                if routed:
                    lru.fresh[walk] = now_s
                    if len(lru.fresh) > _MAX_FRESH:
                        lru.fresh.popitem(last=False)
            walk.upstreams[name] = now_s
            lru.nodes[walk] = None
            lru.nodes.move_to_end(walk)
            walk = walk.parent
        lru.fit()

    def drop_upstream(self, name: str) -> None:
        """Forget everything ``name`` held (it went down; a restart empties its cache)."""
        lru = self._lru.get(name)
        if lru is None:
            return
        for node in list(lru.nodes):
            lru.forget(node)

    def correct(
        self, name: str, marks: list[PathStep], trusted_cached: int, predicted: int, reported: int
    ) -> None:
        """Learn from what ``name`` reported cached for a request routed on ``marks``.

        ``trusted_cached`` counts only marks made by requests whose prefill
        had finished; a report at least ``proof_blocks`` blocks below it is
        proof of eviction. Smaller gaps are left alone: a few tokens of
        difference come from re-tokenized answers or a backend that does not
        keep generated tokens, not from eviction. The budget moves a quarter
        of the way toward each new estimate, so one odd report cannot
        collapse it.
        """
        lru = self._lru.get(name)
        if lru is None:
            return
        stats, cache = lru.stats, lru.cache
        margin = self.proof_blocks * cache.block_size
        if reported + margin <= trusted_cached:
            stats.confirmed_misses += 1
            gone_at = next((m.marked_s for m in marks if m.end_depth > reported), None)
            if gone_at is None:
                return
            before = stats.tokens
            while lru.nodes:
                oldest = next(iter(lru.nodes))
                held = oldest.upstreams or {}
                if held.get(name, float("inf")) > gone_at:
                    break
                lru.forget(oldest)
            stats.corrected_tokens += before - stats.tokens
            if self.learn:
                # What it holds is about what kvern saw it take in since the evicted node.
                floor = cache.capacity_tokens * _MIN_BUDGET_SHARE
                target = max(floor, float(stats.tokens))
                stats.budget += _LEARN_RATE * (target - stats.budget)
        elif reported >= predicted + margin:
            stats.unexpected_hits += 1
            if self.learn:
                ceiling = cache.capacity_tokens * _MAX_BUDGET_FACTOR
                stats.budget = min(ceiling, stats.budget + (reported - predicted))

    # -- the trie's listener ---------------------------------------------------

    def on_split(self, upper: TrieNode, lower: TrieNode) -> None:
        """``upper`` copied ``lower``'s marks; register it (tokens are unchanged).

        ``upper`` joins each LRU at the newest end, so its held ancestors move
        there too, nearest first: the LRU must still drop tails before the
        prefixes they hang from.
        """
        root = self.trie.root
        for name in upper.upstreams or {}:
            lru = self._lru.get(name)
            if lru is None:
                continue
            lru.nodes[upper] = None
            if lower in lru.fresh:
                lru.fresh[upper] = lru.fresh[lower]
            walk = upper.parent
            while walk is not None and walk is not root and name in (walk.upstreams or {}):
                lru.nodes.move_to_end(walk)
                walk = walk.parent

    def on_remove(self, node: TrieNode) -> None:
        """The trie evicted ``node``; it held no descendants, so drop its marks."""
        for name in list(node.upstreams or {}):
            lru = self._lru.get(name)
            if lru is not None and node in lru.nodes:
                lru.forget(node)

    def check_invariants(self) -> None:
        """Token counts match the marks, and every mark's ancestors are marked (tests)."""
        for name, lru in self._lru.items():
            total = 0
            for node in lru.nodes:
                assert node.upstreams is not None and name in node.upstreams
                total += len(node.key)
                parent = node.parent
                if parent is not None and parent is not self.trie.root:
                    assert name in (parent.upstreams or {}), "presence must be ancestor-closed"
            assert total == lru.stats.tokens, (name, total, lru.stats.tokens)
            assert all(node in lru.nodes for node in lru.fresh), "in flight but not held"
