"""The per-model radix trie of token ids: prefix matching, stats and eviction.

Why a radix trie: a chat client re-sends the whole conversation each turn, so
requests share long prefixes (system prompt, earlier turns). Storing each
shared run once, as one edge, lets kvern answer "how much of this prompt could
the backend's prefix cache already serve?" in a handful of node visits, and
rank what to forget when the budget is full.

Why it is pure and synchronous: no I/O, no awaits and no clock inside (every
mutating call takes ``now_s``), so the event loop calls it without a lock and
tests drive time by hand. The trie's clock never runs backwards: an ``insert``
with a ``now_s`` older than one already seen is stamped with the latest seen,
which keeps "an ancestor is never older than its descendants" true.

Why it is fast: the hot path never loops per token in Python. Edges are
``array('i')`` runs; a whole edge is matched with one slice comparison in C,
and the divergence point inside an edge is found by a binary search over slice
comparisons, only when the whole-edge comparison fails. Token ids must fit in a
signed 32-bit int.

One trie is one model's tree; models are never mixed.

Locks: :meth:`RadixTrie.lock` pins the path from a node up to and INCLUDING
the root, so ``root.lock_ref`` counts every lock held. Locked nodes are never
evicted nor expired.

Eviction removes whole leaf edges and never merges a parent left with a single
child back into it: nodes handed to callers (to lock) keep their identity, and
their hit counts stay per prefix.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterator, Sequence

from kvern.trie.edges import TrieListener, as_int_array, common_len, no_access
from kvern.trie.node import TrieNode
from kvern.trie.policies import EvictionPolicy, LRUPolicy
from kvern.trie.records import EvictedPrefix, InsertResult, MatchResult


class RadixTrie:
    """One model's radix trie of token ids."""

    __slots__ = (
        "_policy",
        "_root",
        "_num_tokens",
        "_num_nodes",
        "_latest_s",
        "_next_expire_s",
        "listener",
    )

    def __init__(self, policy: EvictionPolicy | None = None) -> None:
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        # Told of every split and every removed node (routing's per-upstream
        # presence keeps token counts and LRU entries per node); None: nobody.
        self.listener: TrieListener | None = None
        self._root = TrieNode(key=array("i"))
        self._num_tokens = 0
        self._num_nodes = 0
        # Latest now_s seen by insert; the trie's clock never goes back.
        self._latest_s = float("-inf")
        # Earliest now_s at which maintain() runs expire() again.
        self._next_expire_s = float("-inf")

    @property
    def policy(self) -> EvictionPolicy:
        """The eviction policy ranking this trie's leaves."""
        return self._policy

    @property
    def root(self) -> TrieNode:
        """The root node (empty edge, depth 0); never evicted."""
        return self._root

    @property
    def num_tokens(self) -> int:
        """Tokens stored (sum of edge lengths), kept as a counter: O(1)."""
        return self._num_tokens

    @property
    def num_nodes(self) -> int:
        """Nodes excluding the root, kept as a counter: O(1)."""
        return self._num_nodes

    # ----------------------------------------------------------- match/insert

    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest common prefix of ``tokens`` with anything stored. Read-only."""
        key = as_int_array(tokens)
        num_query = len(key)
        node = self._root
        pos = 0
        while pos < num_query:
            child = node.children.get(key[pos])
            if child is None:
                break
            edge = child.key
            num_edge = len(edge)
            if key[pos : pos + num_edge] == edge:
                pos += num_edge
                node = child
                continue
            return MatchResult(pos + common_len(key, pos, edge), child)
        return MatchResult(pos, node)

    def insert(
        self, tokens: Sequence[int], now_s: float, *, count_hit: bool = True
    ) -> InsertResult:
        """Record a request's prompt; one traversal does the match and the insert.

        Every node on the path (the root, split nodes and the new leaf
        included) gets ``hit_count += 1`` and ``last_access_s = now_s``, then
        the policy's ``on_access`` hook (not called for the root, which is
        never ranked).

        ``count_hit=False`` records tokens the backend holds without a request
        having asked for them (an answer appended to its prompt): the path is
        touched (``last_access_s``) but no hit is counted or credited, and a new
        leaf starts at ``hit_count = 0``.
        """
        key = as_int_array(tokens)
        num_query = len(key)
        root = self._root
        if num_query == 0:
            return InsertResult(0, root, 0)
        if now_s < self._latest_s:
            now_s = self._latest_s
        else:
            self._latest_s = now_s
        on_access = self._policy.on_access if count_hit else no_access
        hit = 1 if count_hit else 0
        root.hit_count += hit
        root.last_access_s = now_s
        node = root
        pos = 0
        while pos < num_query:
            first = key[pos]
            child = node.children.get(first)
            if child is None:
                num_new = num_query - pos
                leaf = TrieNode(
                    key=key[pos:],
                    parent=node,
                    depth=node.depth + num_new,
                    hit_count=hit,
                    first_seen_s=now_s,
                    last_access_s=now_s,
                    score_time_s=now_s,
                )
                node.children[first] = leaf
                self._num_tokens += num_new
                self._num_nodes += 1
                on_access(leaf, now_s)
                return InsertResult(pos, leaf, num_new)
            edge = child.key
            num_edge = len(edge)
            if key[pos : pos + num_edge] != edge:
                num_edge = common_len(key, pos, edge)
                child = self._split(child, num_edge)
            child.hit_count += hit
            child.last_access_s = now_s
            on_access(child, now_s)
            pos += num_edge
            node = child
        return InsertResult(num_query, node, 0)

    def _split(self, child: TrieNode, at: int) -> TrieNode:
        """Cut ``child``'s edge after ``at`` tokens; return the new upper node.

        ::

            before                          after _split(child, at=2)

            parent                          parent
              |  key = a b c d e              |  key = a b     upper: NEW node,
            child                           upper              copies child's stats
              |                               |  key = c d e
            (grandchildren)                 child              same object, keeps
                                              |                its stats and depth
                                            (grandchildren)

        The lower half keeps the original object so a node a caller holds
        (and may have locked) still ends where it ended. The upper node copies
        the child's stats: every request that passed through the child passed
        through its upper part too, and every lock through the child pins it.
        """
        parent = child.parent
        assert parent is not None, "split of the root or of a detached node"
        edge = child.key
        upper = TrieNode(
            key=edge[:at],
            children={edge[at]: child},
            parent=parent,
            depth=parent.depth + at,
            hit_count=child.hit_count,
            first_seen_s=child.first_seen_s,
            last_access_s=child.last_access_s,
            lock_ref=child.lock_ref,
            score=child.score,
            score_time_s=child.score_time_s,
            clock_at_access=child.clock_at_access,
            upstreams=dict(child.upstreams) if child.upstreams is not None else None,
        )
        parent.children[edge[0]] = upper
        child.key = edge[at:]
        child.parent = upper
        self._num_nodes += 1
        if self.listener is not None:
            self.listener.on_split(upper, child)
        return upper

    @staticmethod
    def aligned(num_tokens: int, block_size: int) -> int:
        """``num_tokens`` floored to a multiple of ``block_size``.

        Backends cache whole blocks only (vLLM: 16 tokens), so this is the part
        of a match the backend can actually reuse.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return num_tokens - num_tokens % block_size

    # ------------------------------------------------------------------ locks

    def lock(self, node: TrieNode) -> None:
        """Pin ``node`` and every ancestor, root included, against eviction."""
        if node.parent is None and node is not self._root:
            raise ValueError("cannot lock a node that is no longer in the trie")
        walk: TrieNode | None = node
        while walk is not None:
            walk.lock_ref += 1
            walk = walk.parent

    def unlock(self, node: TrieNode) -> None:
        """Release one :meth:`lock` of ``node``; more unlocks than locks is a bug."""
        if node.lock_ref <= 0:
            raise AssertionError(f"unlock of a node with lock_ref={node.lock_ref}")
        walk: TrieNode | None = node
        while walk is not None:
            walk.lock_ref -= 1
            walk = walk.parent

    # ------------------------------------------------------------ inspection

    def prefix_tokens(self, node: TrieNode) -> list[int]:
        """The full token path from the root to the end of ``node``."""
        edges: list[array[int]] = []
        walk: TrieNode | None = node
        while walk is not None:
            edges.append(walk.key)
            walk = walk.parent
        path = array("i")
        for edge in reversed(edges):
            path.extend(edge)
        return path.tolist()

    def iter_nodes(self) -> Iterator[TrieNode]:
        """Every node except the root, parents before children (dict order)."""
        stack = list(reversed(self._root.children.values()))
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(reversed(node.children.values()))

    # --------------------------------------------------------------- eviction

    def _remove_leaves(
        self,
        now_s: float,
        eligible: Callable[[TrieNode], bool],
        keep_going: Callable[[], bool],
        on_evict: Callable[[TrieNode, tuple[float, ...]], None] | None,
        removed: list[EvictedPrefix] | None,
    ) -> int:
        """Remove unlocked, eligible leaves in policy order while ``keep_going()``.

        One O(n) scan seeds a heap with the evictable leaves; a parent that
        becomes an evictable leaf joins the heap. The sequence number breaks
        ties between equal keys in scan order, so orders are deterministic.
        ``on_evict`` (when given) hears of each removed leaf and its key,
        before the leaf's parent is ranked. Returns the tokens removed.

        ``removed`` (when given) gets each leaf's full path, for callers that
        want to see what went. :meth:`maintain` passes None: a leaf's path is
        as long as the conversation it ends, so spelling out every removed
        path cost a transient of (leaves removed) x (their depth) Python ints
        on each eviction -- tens of MB for deep chats, and a process that
        stayed that much larger afterwards.
        """
        if not keep_going():
            return 0
        sort_key = self._policy.sort_key
        root = self._root
        heap: list[tuple[tuple[float, ...], int, TrieNode]] = []
        seq = 0
        for node in self.iter_nodes():
            if not node.children and node.lock_ref == 0 and eligible(node):
                heap.append((sort_key(node, now_s), seq, node))
                seq += 1
        heapq.heapify(heap)
        num_removed = 0
        while heap and keep_going():
            key, _, leaf = heapq.heappop(heap)
            if on_evict is not None:
                on_evict(leaf, key)
            parent = leaf.parent
            assert parent is not None
            if removed is not None:
                removed.append(EvictedPrefix(self.prefix_tokens(leaf), len(leaf.key)))
            num_removed += len(leaf.key)
            del parent.children[leaf.key[0]]
            leaf.parent = None
            if self.listener is not None:
                self.listener.on_remove(leaf)
            self._num_tokens -= len(leaf.key)
            self._num_nodes -= 1
            if (
                parent is not root
                and not parent.children
                and parent.lock_ref == 0
                and eligible(parent)
            ):
                heapq.heappush(heap, (sort_key(parent, now_s), seq, parent))
                seq += 1
        return num_removed

    def evict(self, max_tokens: int, now_s: float) -> list[EvictedPrefix]:
        """Evict leaves in policy order until at most ``max_tokens`` remain.

        Stops early when nothing evictable remains (the rest is locked).
        Returns what was removed, in eviction order. The policy's
        ``on_evict`` hears of each removal (a capacity decision, which is what
        an aging policy's clock follows).
        """
        evicted: list[EvictedPrefix] = []
        self._evict(max_tokens, now_s, evicted)
        return evicted

    def _evict(self, max_tokens: int, now_s: float, removed: list[EvictedPrefix] | None) -> int:
        return self._remove_leaves(
            now_s,
            eligible=lambda node: True,
            keep_going=lambda: self._num_tokens > max_tokens,
            on_evict=self._policy.on_evict,
            removed=removed,
        )

    def expire(self, now_s: float) -> list[EvictedPrefix]:
        """Remove every unlocked leaf idle for longer than the policy's ttl_s.

        A request touches every ancestor of the node it reaches, so an
        ancestor is never older than its descendants: a leaf that is still
        fresh shields all its ancestors, and removing expired leaves
        repeatedly removes exactly the expired, unlocked subtrees. Removal is
        in policy order, like :meth:`evict`, but the policy's ``on_evict`` is
        not called: expiry is not a capacity decision, so an aging policy's
        clock must not jump to the value of an idle but valuable prefix.
        """
        expired: list[EvictedPrefix] = []
        self._expire(now_s, expired)
        return expired

    def _expire(self, now_s: float, removed: list[EvictedPrefix] | None) -> int:
        ttl_s = self._policy.ttl_s
        if ttl_s is None:
            return 0
        cutoff_s = now_s - ttl_s
        return self._remove_leaves(
            now_s,
            eligible=lambda node: node.last_access_s < cutoff_s,
            keep_going=lambda: self._num_tokens > 0,
            on_evict=None,
            removed=removed,
        )

    def maintain(self, max_tokens: int, now_s: float, low_watermark: float = 0.9) -> int:
        """The call a proxy makes after each insert; returns tokens removed.

        Expires idle leaves at most once per ``ttl_s / 10``, and when over
        ``max_tokens`` evicts down to ``int(max_tokens * low_watermark)``, so
        the O(n) leaf scan of an eviction is paid once per many inserts. It
        only counts what it removes (see :meth:`_remove_leaves`).
        """
        if not 0 < low_watermark <= 1:
            raise ValueError(f"low_watermark must be in (0, 1], got {low_watermark}")
        num_removed = 0
        ttl_s = self._policy.ttl_s
        if ttl_s is not None and now_s >= self._next_expire_s:
            self._next_expire_s = now_s + ttl_s / 10
            num_removed += self._expire(now_s, None)
        if self._num_tokens > max_tokens:
            num_removed += self._evict(int(max_tokens * low_watermark), now_s, None)
        return num_removed
