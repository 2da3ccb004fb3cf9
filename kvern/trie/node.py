"""One node of the per-model token radix trie.

Why a node carries its statistics itself: the eviction policies rank nodes by
recency, frequency and depth, and the routing layer asks which upstream has
seen a prefix. Keeping those values on the node makes every policy a pure
function of one node (see :mod:`kvern.trie.policies`) and keeps the hot path to
a few attribute stores per node, with no side tables to keep in step.

Why ``array('i')`` edge labels: four bytes a token instead of a list's eight
byte pointer plus a 28-byte int object, and slice equality between two
``array('i')`` runs in C, so matching a long shared prefix never loops per
token in Python.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class TrieNode:
    """A run of tokens (an edge) and what kvern knows about the prefix ending here.

    ``eq=False`` keeps identity hashing and comparison: two nodes with equal
    fields are still different places in the tree, and callers hold nodes (to
    lock them) across later inserts.
    """

    # Edge label: the token ids on the edge from the parent to this node;
    # empty only for the root.
    key: array[int]
    # Children keyed by the first token id of the child's edge.
    children: dict[int, TrieNode] = field(default_factory=dict)
    # The node above this one; None for the root and for evicted nodes.
    parent: TrieNode | None = None
    # Tokens from the root to the END of this node's edge.
    depth: int = 0
    # Requests whose prompt passed through (or ended at) this node.
    hit_count: int = 0
    # When a request first created this prefix, in the caller's clock (s).
    first_seen_s: float = 0.0
    # When a request last passed through this node, in the caller's clock (s).
    last_access_s: float = 0.0
    # In-flight requests holding a path through this node; > 0 pins it.
    lock_ref: int = 0
    # Policy-owned running value (lfu: decayed hit count; cost_aware: decayed
    # count of requests that ended or branched off here); 0 for LRU.
    score: float = 0.0
    # The time ``score`` was last brought up to date, so a policy can decay it
    # correctly whatever the order of stat updates around its hook (s).
    score_time_s: float = 0.0
    # The policy's aging clock (cost_aware's inflation value L) at the node's
    # last access; stays 0 under policies without one.
    clock_at_access: float = 0.0
    # Upstream name -> last time that upstream served this prefix (s); None
    # until routing records one.
    upstreams: dict[str, float] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens on this node's own edge (not the whole prefix)."""
        return len(self.key)

    @property
    def is_leaf(self) -> bool:
        """True when nothing hangs below this node."""
        return not self.children
