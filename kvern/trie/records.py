"""What the trie hands back: results of a match or insert, hot prefixes, evictions, size.

Why a module of their own: these are the trie's answers, read by the tracking
thread, the cache models and the endpoints, none of which needs the tree
surgery in :mod:`kvern.trie.radix` to know their shape. They are plain
``slots`` records; the only live object any holds is the :class:`TrieNode` a
match or insert ends at (for the caller to lock).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvern.trie.node import TrieNode


@dataclass(slots=True)
class MatchResult:
    """The longest stored prefix of a token sequence."""

    # Leading tokens of the query present in the trie.
    matched_tokens: int
    # Deepest node fully or partially matched; the root when nothing matched.
    node: TrieNode


@dataclass(slots=True)
class InsertResult:
    """What an insert found and added."""

    # Leading tokens already present before this call: what the backend's
    # prefix cache could have served.
    matched_tokens: int
    # The node where the sequence ends (lock it while the request is in flight).
    node: TrieNode
    # Tokens this call added to the trie.
    new_tokens: int


@dataclass(slots=True)
class HotPrefix:
    """A frequently used prefix, for the hot-prefix endpoint."""

    # The full token path from the root to the end of the node.
    tokens: list[int]
    # Length of that path (tokens).
    depth: int
    # Requests that passed through the node.
    hit_count: int
    # When the prefix was first created (s).
    first_seen_s: float
    # When a request last passed through it (s).
    last_access_s: float


@dataclass(slots=True)
class EvictedPrefix:
    """One leaf removed by eviction or expiry."""

    # The full token path from the root to the end of the removed leaf.
    tokens: list[int]
    # Tokens removed: the leaf's edge length only.
    num_tokens: int


@dataclass(slots=True)
class TrieStats:
    """Size of the trie, for on-demand endpoints."""

    # Nodes excluding the root.
    num_nodes: int
    # Sum of edge lengths (tokens stored).
    num_tokens: int
    # Measured estimate of the Python heap the trie holds (bytes).
    estimated_bytes: int
