"""Edge helpers of the radix trie, and the listener protocol for its structural changes.

Why apart: these are the pieces :class:`~kvern.trie.radix.RadixTrie` uses on
its hot path (edge comparison by C-speed slices) and the one hook other
layers use to follow its shape (routing's per-upstream presence).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Protocol

from kvern.trie.node import TrieNode


class TrieListener(Protocol):
    """What hears of structural changes (see :class:`RadixTrie`'s ``listener``)."""

    def on_split(self, upper: TrieNode, lower: TrieNode) -> None: ...

    def on_remove(self, node: TrieNode) -> None: ...


def as_int_array(tokens: Sequence[int]) -> array[int]:
    """The tokens as an ``array('i')``, converted once (no copy if already one)."""
    if isinstance(tokens, array) and tokens.typecode == "i":
        return tokens
    return array("i", tokens)


def no_access(node: TrieNode, now_s: float) -> None:
    """The access hook of uncounted inserts."""


def common_len(key: array[int], pos: int, edge: array[int]) -> int:
    """Length of the common prefix of ``key[pos:]`` and ``edge``.

    Called only after the whole-edge comparison failed and the first tokens
    are known equal, so the answer is in ``[1, len(edge)]``. Binary search over
    slice equality: O(log n) Python steps, each a C comparison.
    """
    hi = min(len(edge), len(key) - pos)
    if key[pos : pos + hi] == edge[:hi]:
        return hi
    lo = 1  # key[pos:pos+lo] == edge[:lo]; the answer is in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key[pos : pos + mid] == edge[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
