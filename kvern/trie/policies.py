"""Eviction policies: small objects that rank evictable trie leaves.

Why policies only return a sort key: the trie owns the tree surgery (which
leaves are evictable, pushing a parent that becomes a leaf, locks), so a policy
is a pure ranking of one node at a time. The lowest key is evicted first; every
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
    Value = decayed hit frequency (as ``lfu``) x recompute cost, where the
    recompute cost is what evicting this leaf would make the backend prefill
    again. A prefill token at position ``p`` attends to all ``p`` earlier
    tokens, so a token's cost grows with its depth::

        cost = num_tokens * (1 + mid_depth / attention_tokens)
        mid_depth = depth - num_tokens / 2     # average position on the edge

    ``attention_tokens`` is the depth at which a token's attention work is
    taken to equal its fixed (projection + MLP) work, doubling its cost.

    Seed scenario this exists for: depth-blind LRU evicted a 47-token-deep hot
    node (a shared system prompt) because a shallow one-off was touched more
    recently. Under ``cost_aware`` the hot deep node is worth
    ``hits x ~47`` and the one-off ``1 x ~4``, so the one-off goes first.
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


@dataclass(slots=True, frozen=True)
class CostAwarePolicy:
    """Lowest (decayed hit frequency x recompute cost) leaf first."""

    # Time for a hit's weight to halve (s).
    half_life_s: float = 600.0
    # Depth at which a prefill token's attention work doubles its cost (tokens).
    attention_tokens: int = 4096
    # Idle time after which an unlocked leaf expires; None = never (s).
    ttl_s: float | None = None
    # Registry name.
    name: str = field(default="cost_aware", init=False)
    # ln 2 / half_life_s, precomputed for the hot path (1/s).
    _decay_per_s: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_half_life(self.name, self.half_life_s)
        _check_ttl(self.name, self.ttl_s)
        if not self.attention_tokens >= 1:
            raise ValueError(
                f"policy 'cost_aware' needs attention_tokens >= 1, got {self.attention_tokens!r}"
            )
        object.__setattr__(self, "_decay_per_s", _LN2 / self.half_life_s)

    def on_access(self, node: TrieNode, now_s: float) -> None:
        """Decay the running hit count to now and add this hit."""
        _touch_decayed(node, now_s, self._decay_per_s)

    def recompute_cost(self, node: TrieNode) -> float:
        """Prefill work, in token-equivalents, to rebuild this node's edge."""
        num_tokens = len(node.key)
        mid_depth = node.depth - num_tokens / 2
        return num_tokens * (1.0 + mid_depth / self.attention_tokens)

    def sort_key(self, node: TrieNode, now_s: float) -> tuple[float, ...]:
        """Lowest expected recompute work saved by keeping the node first."""
        value = _decayed_score(node, now_s, self._decay_per_s) * self.recompute_cost(node)
        return (value, node.last_access_s, node.depth)


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
