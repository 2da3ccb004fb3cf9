"""What one walk down a model's trie found: each upstream's longest held prefix of a prompt.

Its own module because it is read far from where presence is written: the
router's answer, the prediction of what the chosen upstream reports cached,
the proof an eviction needs (marks older than any request still prefilling),
and a prefix's request rate all come from one :class:`PresenceMatch`, built by
:meth:`kvern.routing.presence.ModelPresence.match` before the request marks
anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvern.routing.prefix_answer import InFlightPrefix, PrefixAnswer
from kvern.trie.node import TrieNode

# The shortest time a prefix's request rate is averaged over (s): long
# enough that a conversation's own turns (a few seconds apart) never make its
# newest node hot, short enough that a tenant's burst is seen while it lasts.
_HOT_WINDOW_S = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamCache:
    """What kvern is told about one upstream's prefix cache."""

    name: str
    capacity_tokens: int
    block_size: int


@dataclass(slots=True)
class PathStep:
    """One node on a request's path (and, in :meth:`PresenceMatch.marks`, one upstream's mark)."""

    node: TrieNode
    end_depth: int  # tokens from the root to the end of this node (or of the match in it)
    marked_s: float | None  # the upstream's last use of it; None when not held


@dataclass(slots=True)
class PresenceMatch:
    """A prompt's longest held prefix on every upstream (before the request marks anything)."""

    num_tokens: int  # the prompt's length
    depth: dict[str, int]  # upstream -> contiguous prefix it holds (tokens)
    path: list[PathStep] = field(default_factory=list)  # root side first
    fill: dict[str, float] = field(default_factory=dict)  # upstream -> share of its budget held
    # upstream -> prompt tokens ever newly marked there: the content routed
    # its way (what SGLang's router calls its tree size), evicted or not.
    assigned: dict[str, int] = field(default_factory=dict)

    def answer(
        self,
        cached: dict[str, int],
        hot_per_s: float,
        in_flight: dict[str, InFlightPrefix] | None = None,
    ) -> PrefixAnswer:
        """The router's part of this match (plain numbers)."""
        return PrefixAnswer(
            self.num_tokens,
            cached,
            dict(self.fill),
            hot_per_s,
            dict(self.assigned),
            in_flight or {},
        )

    def reusable(self, held: int, block_size: int) -> int:
        """Of ``held`` leading tokens, those reused: whole blocks, never the last token."""
        usable = min(held, max(self.num_tokens - 1, 0))
        return usable - usable % block_size

    def cached(self, cache: UpstreamCache) -> int:
        """Tokens the upstream should report cached, by kvern's model of it."""
        return self.reusable(self.depth.get(cache.name, 0), cache.block_size)

    def trusted_cached(self, cache: UpstreamCache, trusted_before: float) -> int:
        """Like :meth:`cached`, counting only marks made before ``trusted_before``.

        Call it before the request marks its own path.
        """
        depth = 0
        for step in self.path:
            marked_s = (step.node.upstreams or {}).get(cache.name)
            if marked_s is None or marked_s >= trusted_before:
                break
            depth = step.end_depth
        return self.reusable(min(depth, self.depth.get(cache.name, 0)), cache.block_size)

    def requests_per_s(self, depth: int, now_s: float) -> float:
        """How many requests a second have gone through the node holding token ``depth``.

        A tenant's system prompt shared by every session is a node many
        requests go through; a conversation's own history is one few do.
        The rate is over the node's life (``hit_count`` since it was first
        seen) but never over less than ``_HOT_WINDOW_S``: a conversation's
        newest node, two turns in two seconds, is not a hot prefix. It is 0
        once the node has been idle for ten of its mean gaps.
        """
        if depth <= 0:
            return 0.0
        for step in self.path:
            if step.end_depth >= depth:
                node = step.node
                rate = node.hit_count / max(now_s - node.first_seen_s, _HOT_WINDOW_S)
                idle = now_s - node.last_access_s
                return 0.0 if rate <= 0 or idle * rate > 10.0 else rate
        return 0.0

    def marks(self, name: str) -> list[PathStep]:
        """The path with ``name``'s marks (for a later correction)."""
        return [
            PathStep(s.node, s.end_depth, (s.node.upstreams or {}).get(name)) for s in self.path
        ]
