"""What a trie shows people: its hottest prefixes and its size.

Why a separate module: reporting reads the tree but never changes it, and it
runs on demand (``/trie/visualize``), not per request; keeping it apart leaves
radix.py to the bookkeeping that must keep the trie's counters right.
"""

from __future__ import annotations

import heapq
import sys

from kvern.trie.radix import RadixTrie
from kvern.trie.records import HotPrefix, TrieStats

# Bytes of one int object that a dict key holds a reference to, for ids
# outside CPython's small-int cache (-5..256).
_INT_OBJECT_BYTES = sys.getsizeof(10**6)
# Bytes of one float object (the values of a node's upstreams dict).
_FLOAT_OBJECT_BYTES = sys.getsizeof(1.0)


def hot_prefixes(trie: RadixTrie, n: int, min_depth: int = 0) -> list[HotPrefix]:
    """The ``n`` most hit prefixes at least ``min_depth`` tokens long.

    Ordered by hit_count, then deeper first, then more recent. A node is
    skipped when one of its children has the same hit_count: that child is
    an equally hot longer prefix, and showing the longest is more useful.
    """
    candidates = [
        node
        for node in trie.iter_nodes()
        if node.depth >= min_depth
        and node.hit_count > 0
        and not any(c.hit_count == node.hit_count for c in node.children.values())
    ]
    top = heapq.nsmallest(n, candidates, key=lambda x: (-x.hit_count, -x.depth, -x.last_access_s))
    return [
        HotPrefix(
            tokens=trie.prefix_tokens(node),
            depth=node.depth,
            hit_count=node.hit_count,
            first_seen_s=node.first_seen_s,
            last_access_s=node.last_access_s,
        )
        for node in top
    ]


def measure(trie: RadixTrie) -> TrieStats:
    """Node and token counts plus a measured memory estimate (an O(n) walk)."""
    getsizeof = sys.getsizeof
    root = trie.root
    total_bytes = 0
    for node in (root, *trie.iter_nodes()):
        total_bytes += getsizeof(node) + getsizeof(node.children) + getsizeof(node.key)
        total_bytes += _INT_OBJECT_BYTES * sum(
            1 for first in node.children if first > 256 or first < -5
        )
        if node.upstreams is not None:
            total_bytes += getsizeof(node.upstreams)
            total_bytes += _FLOAT_OBJECT_BYTES * len(node.upstreams)
    return TrieStats(trie.num_nodes, trie.num_tokens, total_bytes)
