"""The per-model token radix trie and its eviction policies.

Pure and synchronous (no I/O, no awaits, no clock): callers pass ``now_s``.
"""

from __future__ import annotations

from kvern.trie.node import TrieNode
from kvern.trie.policies import (
    POLICIES,
    CostAwarePolicy,
    EvictionPolicy,
    LFUDecayPolicy,
    LRUPolicy,
    TTLPolicy,
    make_policy,
)
from kvern.trie.radix import RadixTrie
from kvern.trie.records import (
    EvictedPrefix,
    HotPrefix,
    InsertResult,
    MatchResult,
    TrieStats,
)

__all__ = [
    "POLICIES",
    "CostAwarePolicy",
    "EvictedPrefix",
    "EvictionPolicy",
    "HotPrefix",
    "InsertResult",
    "LFUDecayPolicy",
    "LRUPolicy",
    "MatchResult",
    "RadixTrie",
    "TTLPolicy",
    "TrieNode",
    "TrieStats",
    "make_policy",
]
