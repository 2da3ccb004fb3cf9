"""After an insert: did an earlier prompt go on past the match, and how far?

Why its own module: the live tracker (:mod:`kvern.tracking.divergence`) and
every replay (:mod:`kvern.diagnosis.replay`, ``kvern analyze``) must decide
``diverged`` against ``novel`` the same way. The node the new leaf hangs
from is where the prompt parted; a sibling there is an earlier prompt that
went on with other tokens, and its most-hit path down to a leaf says how far
it went -- what the divergence cost at most.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvern.trie.node import TrieNode
from kvern.trie.records import InsertResult


@dataclass(frozen=True, slots=True)
class Continuation:
    """What an insert found past its match."""

    continued: bool  # an earlier prompt went on past the match with other tokens
    reach: int  # how far (tokens from the start) that earlier prompt went
    theirs: list[int] = field(default_factory=list)  # its first tokens past the match


def _most_hit(children: Iterable[TrieNode]) -> TrieNode | None:
    best: TrieNode | None = None
    for child in children:
        if best is None or child.hit_count > best.hit_count:
            best = child
    return best


def continuation(result: InsertResult, their_tokens: int = 0) -> Continuation:
    """The continuation an insert's new leaf parted from (``their_tokens`` of it kept)."""
    leaf = result.node
    parent = leaf.parent
    if result.new_tokens == 0 or parent is None:
        return Continuation(False, result.matched_tokens)
    node = _most_hit(c for c in parent.children.values() if c is not leaf)
    if node is None:
        return Continuation(False, result.matched_tokens)
    theirs: list[int] = []
    while True:
        if len(theirs) < their_tokens:
            theirs.extend(node.key[: their_tokens - len(theirs)])
        nxt = _most_hit(node.children.values())
        if nxt is None:
            return Continuation(True, node.depth, theirs)
        node = nxt
