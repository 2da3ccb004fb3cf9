"""Eviction policies: small objects that rank evictable trie leaves.

Why policies only return a sort key: the trie owns the tree surgery (which
leaves are evictable, pushing a parent that becomes a leaf, locks), so a policy
is a ranking of one node at a time (``cost_aware`` also keeps one number, its
aging clock, fed by ``on_evict``). The lowest key is evicted first; every
key ends with ``(last_access_s, depth)`` so equal scores fall back to recency,
then to shallower-first, and eviction orders are deterministic.

The policies
------------
``lru``
    Key ``(last_access_s, depth)``. Cheap and blind to how often or how deep.
``lfu``
    LFU with exponential decay. ``node.score`` is a running decayed hit count,
    updated on every pass::

        score = score * 0.5 ** ((now_s - score_time_s) / half_life_s) + 1

    and ranked by the same decayed value evaluated at eviction time, so a burst
    of hits an hour ago does not outrank steady recent use forever.
``cost_aware``
    Greedy-Dual-Size-Frequency (GDSF) with aging. The policy keeps a clock
    ``L`` (one per trie), raised on every capacity eviction to the priority of
    the leaf evicted (never lowered). On every access a node's priority
    restarts from the clock::

        H = L_at_last_access + F x cost / num_tokens
        cost / num_tokens = 1 + mid_depth / attention_tokens
        mid_depth = depth - num_tokens / 2     # average position on the edge

    ``cost`` is what evicting the leaf would make the backend prefill again: a
    prefill token at position ``p`` attends to all ``p`` earlier tokens, so its
    cost grows with depth; ``attention_tokens`` is the depth at which that
    attention work equals the token's fixed (projection + MLP) work. Dividing
    by ``num_tokens`` (the budget the leaf frees) ranks value per token of
    budget, as a knapsack should: not dividing lets a long edge used once
    outrank short ones used often, and fell below LRU on the bench's chat
    trace (prefix hit rate at a 1/10 budget 88.77% vs 88.79%; at 1/4 88.91%
    vs 88.92%).

    ``F`` is the node's *own* use count, decayed with ``half_life_s``::

        F = F * 0.5 ** ((now_s - score_time_s) / half_life_s) + 1

    A request adds its unit to the deepest node it reused: where it ended, or
    where it branched off into tokens the trie did not have. Passing on into
    an existing child, or extending a leaf (a chat's next turn), moves the unit
    down, so a conversation's earlier turns are not credited again by each
    later turn (``hit_count`` still counts every pass), while a system prompt
    gets one unit per chat that branches off it.

    Why the clock: without it a policy ranking by frequency alone (``lfu``,
    and ``cost_aware`` before this formula) pollutes its cache. Each chat's
    next request extends its newest leaf, whose count is 1, so fresh leaves
    are evicted before old, once-hot ones, forever. Under GDSF a just-touched
    node starts at the current eviction level, so it cannot go before an
    untouched node of the same size and count; an old node's advantage lasts
    only until the clock has risen past it, while a deep node that keeps being
    reused is re-based on every access and stays above. Why the own count: a
    chat's turns are one correlated burst; counting every pass through them
    let dead chats outrank live ones (1/10 budget: 88.47% vs LRU 88.79%). Why
    the decay is kept: it orders idle nodes by age inside one clock level
    (evictions come in batches, so the clock moves in steps) and without it
    ``cost_aware`` fell below LRU at the 1/4 budget (88.87% vs 88.92%).
    With all three it beats LRU at 1/4 and 1/10 (``bench/trie_bench.py``).

    Seed scenario this exists for: depth-blind LRU evicted a 47-token-deep hot
    node (a shared system prompt) because a shallow one-off was touched more
    recently. Under ``cost_aware`` the prompt's many requests keep its ``F``
    far above the one-off's 1, so the one-off goes first.

    The policy object holds the clock, so each trie needs its own instance.
    Expiry (TTL) does not move the clock: it is not a capacity decision.
``ttl``
    LRU ordering with a required ``ttl_s``.

TTL is combinable with every policy: each accepts ``ttl_s`` (None = no
expiry), and :meth:`kvern.trie.radix.RadixTrie.expire` removes unlocked
leaves idle for longer than that regardless of capacity.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvern.trie.node import TrieNode

_LN2 = math.log(2.0)


class EvictionPolicy(Protocol):
    """What the trie needs from a policy."""

    @property
    def name(self) -> str:
        """Registry name, for logs and config round trips."""
        ...

    @property
    def ttl_s(self) -> float | None:
        """Idle time after which an unlocked leaf expires; None = never."""
        ...

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Called for each node on a request's path, after hit_count and
        last_access_s have been updated; may update ``node.score``."""
        ...

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Rank for eviction at ``now_s``: the lowest key is evicted first."""
        ...

    def on_evict(self, node: TrieNode, key: tuple[float, ...]) -> None:
        """Called for each leaf :meth:`RadixTrie.evict` removes, with the key
        it was ranked by (not for expiry, which is no capacity decision)."""
        ...


def _check_ttl(name: str, ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"policy {name!r} needs ttl_s > 0 or None, got {ttl_s!r}")


def _check_half_life(name: str, half_life_s: float) -> None:
    if not half_life_s > 0:
        raise ValueError(f"policy {name!r} needs half_life_s > 0, got {half_life_s!r}")


def _touch_decayed(node: TrieNode, now_s: float, decay_per_s: float) -> None:
    """Add one hit to the node's decayed hit count, decaying it to ``now_s`` first.

    Uses ``score_time_s`` rather than ``last_access_s`` because the trie has
    already overwritten ``last_access_s`` when this hook runs.
    """
    dt_s = now_s - node.score_time_s
    if dt_s > 0:
        node.score = node.score * math.exp(-dt_s * decay_per_s) + 1.0
        node.score_time_s = now_s
    else:
        node.score += 1.0


def _decayed_score(node: TrieNode, now_s: float, decay_per_s: float) -> float:
    dt_s = now_s - node.score_time_s
    if dt_s > 0:
        return node.score * math.exp(-dt_s * decay_per_s)
    return node.score


@dataclass(slots=True, frozen=True)
class LRUPolicy:
    """Least recently used leaf first."""

    # Idle time after which an unlocked leaf expires; None = never (s).
    ttl_s: float | None = None
    # Registry name.
    name: str = field(default="lru", init=False)

    def __post_init__(self) -> None:
        _check_ttl(self.name, self.ttl_s)

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Nothing to keep: recency is already on the node."""

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Oldest access first, shallower first among equals."""
        return (node.last_access_s, node.depth)

    def on_evict(self, node: TrieNode, key: tuple[float, ...]) -> None:
        """Nothing to keep: the ranking does not depend on what went before."""


@dataclass(slots=True, frozen=True)
class TTLPolicy:
    """LRU ordering plus a mandatory idle timeout: the ``ttl`` registry entry."""

    # Idle time after which an unlocked leaf expires (s); required, > 0.
    ttl_s: float | None = None
    # Registry name.
    name: str = field(default="ttl", init=False)

    def __post_init__(self) -> None:
        if self.ttl_s is None or not self.ttl_s > 0:
            raise ValueError(f"policy 'ttl' needs ttl_s > 0, got {self.ttl_s!r}")

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Nothing to keep: recency is already on the node."""

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Oldest access first, shallower first among equals."""
        return (node.last_access_s, node.depth)

    def on_evict(self, node: TrieNode, key: tuple[float, ...]) -> None:
        """Nothing to keep: the ranking does not depend on what went before."""


@dataclass(slots=True, frozen=True)
class LFUDecayPolicy:
    """Least (exponentially decayed) frequently used leaf first."""

    # Time for a hit's weight to halve (s).
    half_life_s: float = 600.0
    # Idle time after which an unlocked leaf expires; None = never (s).
    ttl_s: float | None = None
    # Registry name.
    name: str = field(default="lfu", init=False)
    # ln 2 / half_life_s, precomputed for the hot path (1/s).
    _decay_per_s: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_half_life(self.name, self.half_life_s)
        _check_ttl(self.name, self.ttl_s)
        object.__setattr__(self, "_decay_per_s", _LN2 / self.half_life_s)

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Decay the running hit count to now and add this hit."""
        _touch_decayed(node, now_s, self._decay_per_s)

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Lowest decayed hit count at ``now_s`` first."""
        return (_decayed_score(node, now_s, self._decay_per_s), node.last_access_s, node.depth)

    def on_evict(self, node: TrieNode, key: tuple[float, ...]) -> None:
        """Nothing to keep: the ranking does not depend on what went before."""


@dataclass(slots=True)
class CostAwarePolicy:
    """Greedy-Dual-Size-Frequency with aging: lowest ``L_at_access + F x cost / size`` first.

    Not frozen: it holds its trie's aging clock, so every trie needs its own
    instance (:func:`kvern.tracking.forest.policy_from_config` builds one per model).
    """

    # Time for a credited request's weight in the frequency F to halve (s).
    half_life_s: float = 600.0
    # Depth at which a prefill token's attention work doubles its cost (tokens).
    attention_tokens: int = 4096
    # Idle time after which an unlocked leaf expires; None = never (s).
    ttl_s: float | None = None
    # Registry name.
    name: str = field(default="cost_aware", init=False)
    # ln 2 / half_life_s, precomputed for the hot path (1/s).
    _decay_per_s: float = field(default=0.0, init=False, repr=False)
    # The aging clock L: the highest priority evicted so far (priority units).
    _clock: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_half_life(self.name, self.half_life_s)
        _check_ttl(self.name, self.ttl_s)
        if not self.attention_tokens >= 1:
            raise ValueError(
                f"policy 'cost_aware' needs attention_tokens >= 1, got {self.attention_tokens!r}"
            )
        self._decay_per_s = _LN2 / self.half_life_s

    @property
    def clock(self) -> float:
        """The aging clock L; rises only as :meth:`on_evict` reports evictions."""
        return self._clock

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Restart the node's priority from the clock and credit it this request.

        Called down the request's path, parent first. The request's unit of F
        ends on the deepest node it reused: passing into a child the trie
        already had (``hit_count > 1``) takes the unit back from the parent,
        and so does extending a leaf (the new node is the parent's only
        child): that is a conversation's next turn, not a second use.
        """
        node.clock_at_access = self._clock
        _touch_decayed(node, now_s, self._decay_per_s)
        parent = node.parent
        if parent is None or parent.parent is None:  # the root is never ranked
            return
        if node.hit_count > 1 or len(parent.children) == 1:
            # The parent was credited earlier in this same call, at this now_s.
            parent.score -= 1.0

    def recompute_cost(self, node: TrieNode) -> float:
        """Prefill work, in token-equivalents, to rebuild this node's edge."""
        num_tokens = len(node.key)
        mid_depth = node.depth - num_tokens / 2
        return num_tokens * (1.0 + mid_depth / self.attention_tokens)

    def cost_per_token(self, node: TrieNode) -> float:
        """``recompute_cost / num_tokens``: work saved per token of budget kept."""
        mid_depth = node.depth - len(node.key) / 2
        return 1.0 + mid_depth / self.attention_tokens

    def priority(self, node: TrieNode, now_s: float) -> float:
        """``H = L_at_access + F x cost / size``, with F decayed to ``now_s``."""
        frequency = _decayed_score(node, now_s, self._decay_per_s)
        return node.clock_at_access + frequency * self.cost_per_token(node)

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Lowest priority first; then least recent, then shallower."""
        return (self.priority(node, now_s), node.last_access_s, node.depth)

    def on_evict(self, node: TrieNode, key: tuple[float, ...]) -> None:
        """Raise the clock to the evicted leaf's priority (never lower it)."""
        if key[0] > self._clock:
            self._clock = key[0]


# Registry name -> policy class; configuration picks one by name.
POLICIES: dict[str, type[EvictionPolicy]] = {
    "cost_aware": CostAwarePolicy,
    "lfu": LFUDecayPolicy,
    "lru": LRUPolicy,
    "ttl": TTLPolicy,
}


def make_policy(name: str, /, **params: Any) -> EvictionPolicy:
    """Build a policy from its registry name and keyword parameters.

    Raises ValueError naming the unknown policy, an unknown parameter, or the
    parameter whose value is out of range, so a config error points at its key.
    """
    cls = POLICIES.get(name)
    if cls is None:
        expected = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; expected one of {expected}")
    accepted = sorted(inspect.signature(cls).parameters)
    for param in params:
        if param not in accepted:
            raise ValueError(
                f"policy {name!r} got unknown parameter {param!r}; "
                f"expected one of {', '.join(accepted)}"
            )
    return cls(**params)
