"""RadixTrie against a naive reference: a list of sequences and longest common prefixes.

Small alphabets (tokens 0..4) and short sequences make prefixes collide, so
splits, partial matches and parents-becoming-leaves happen in most examples.
After an eviction the reference is rebuilt from the trie's remaining leaf
paths, once each is checked to be a prefix of something inserted; from then on
the exact checks resume against it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvern.trie import CostAwarePolicy, EvictedPrefix, RadixTrie, TrieNode, make_policy
from kvern.trie.invariants import check_trie

Seq = tuple[int, ...]

TOKENS = st.integers(min_value=0, max_value=4)
SEQUENCES = st.lists(TOKENS, max_size=20).map(tuple)
POLICY_PARAMS: dict[str, dict[str, float]] = {
    "lru": {},
    "lru+ttl": {"ttl_s": 10.0},
    "lfu": {"half_life_s": 5.0},
    "cost_aware": {"half_life_s": 5.0, "attention_tokens": 4, "ttl_s": 15.0},
    "ttl": {"ttl_s": 10.0},
}


def common_len(a: Seq, b: Seq) -> int:
    """Length of the longest common prefix of two sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reference_match(stored: list[Seq], query: Seq) -> int:
    """The longest common prefix of ``query`` with any stored sequence."""
    return max((common_len(s, query) for s in stored), default=0)


def is_prefix_of_any(tokens: Seq, stored: list[Seq]) -> bool:
    return any(s[: len(tokens)] == tokens for s in stored)


def leaf_paths(trie: RadixTrie) -> list[Seq]:
    """Every root-to-leaf path: together they are exactly what the trie holds."""
    paths: list[Seq] = []
    stack = list(trie.root.children.values())
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        else:
            paths.append(tuple(trie.prefix_tokens(node)))
    return paths


class TrieMachine(RuleBasedStateMachine):
    """Random inserts, matches, evictions, expiry and locks on one trie."""

    def __init__(self) -> None:
        super().__init__()
        self.trie = RadixTrie()
        # Sequences whose prefixes are exactly what the trie holds.
        self.stored: list[Seq] = []
        # Locked nodes and the sequence each was locked for.
        self.locks: list[tuple[TrieNode, Seq]] = []
        self.now_s = 0.0
        # The cost_aware clock at the last check: it must never go back.
        self.clock = 0.0

    @initialize(policy=st.sampled_from(sorted(POLICY_PARAMS)))
    def choose_policy(self, policy: str) -> None:
        self.trie = RadixTrie(make_policy(policy.split("+")[0], **POLICY_PARAMS[policy]))

    def _tick(self, dt_s: int) -> float:
        self.now_s += dt_s
        return self.now_s

    def _insert(self, seq: Seq, dt_s: int) -> TrieNode:
        expected = reference_match(self.stored, seq)
        result = self.trie.insert(list(seq), self._tick(dt_s))
        assert result.matched_tokens == expected
        assert result.new_tokens == len(seq) - expected
        assert self.trie.prefix_tokens(result.node) == list(seq)
        assert self.trie.match(seq).matched_tokens == len(seq)
        if seq:
            assert result.node.last_access_s == self.now_s
        self.stored.append(seq)
        return result.node

    def _removed(self, before_tokens: int, removed: list[EvictedPrefix]) -> None:
        """Account for an eviction/expiry and rebuild the reference from the trie."""
        assert sum(e.num_tokens for e in removed) == before_tokens - self.trie.num_tokens
        for evicted in removed:
            assert evicted.num_tokens >= 1
            assert is_prefix_of_any(tuple(evicted.tokens), self.stored)
        self._rebuild_reference()

    def _rebuild_reference(self) -> None:
        """What is left must be prefixes of what was stored; it becomes the reference."""
        remaining = leaf_paths(self.trie)
        for path in remaining:
            assert is_prefix_of_any(path, self.stored)
        self.stored = remaining

    @rule(seq=SEQUENCES, dt_s=st.integers(0, 3))
    def insert(self, seq: Seq, dt_s: int) -> None:
        self._insert(seq, dt_s)

    @rule(seq=SEQUENCES, dt_s=st.integers(0, 3))
    def insert_and_lock(self, seq: Seq, dt_s: int) -> None:
        node = self._insert(seq, dt_s)
        self.trie.lock(node)
        self.locks.append((node, seq))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.locks) - 1))
        node, _ = self.locks.pop(index)
        self.trie.unlock(node)

    @rule(seq=SEQUENCES)
    def match(self, seq: Seq) -> None:
        result = self.trie.match(seq)
        assert result.matched_tokens == reference_match(self.stored, seq)
        node = result.node
        start = node.depth - len(node.key)
        assert start <= result.matched_tokens <= node.depth
        if node is not self.trie.root:
            assert start < result.matched_tokens
        assert self.trie.prefix_tokens(node)[: result.matched_tokens] == list(
            seq[: result.matched_tokens]
        )

    @rule(max_tokens=st.integers(0, 60), dt_s=st.integers(0, 3))
    def evict(self, max_tokens: int, dt_s: int) -> None:
        before = self.trie.num_tokens
        removed = self.trie.evict(max_tokens, self._tick(dt_s))
        if self.trie.num_tokens > max_tokens:  # stopped early: only locked leaves left
            assert all(n.lock_ref > 0 for n in self._leaves())
        if before <= max_tokens:
            assert removed == []
        self._removed(before, removed)

    @rule(max_tokens=st.integers(0, 60), dt_s=st.integers(0, 6))
    def maintain(self, max_tokens: int, dt_s: int) -> None:
        before = self.trie.num_tokens
        now_s = self._tick(dt_s)
        num_removed = self.trie.maintain(max_tokens, now_s, low_watermark=0.5)
        assert num_removed == before - self.trie.num_tokens
        if self.trie.num_tokens > max_tokens:
            assert all(n.lock_ref > 0 for n in self._leaves())
        self._rebuild_reference()

    @rule(dt_s=st.integers(0, 20))
    def expire(self, dt_s: int) -> None:
        before = self.trie.num_tokens
        now_s = self._tick(dt_s)
        removed = self.trie.expire(now_s)
        ttl_s = self.trie.policy.ttl_s
        if ttl_s is None:
            assert removed == []
        else:
            for leaf in self._leaves():
                assert leaf.lock_ref > 0 or leaf.last_access_s >= now_s - ttl_s
        self._removed(before, removed)

    def _leaves(self) -> list[TrieNode]:
        leaves: list[TrieNode] = []
        stack = list(self.trie.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children:
                leaves.append(node)
        return leaves

    @invariant()
    def counters_match_a_recount(self) -> None:
        check_trie(self.trie)

    @invariant()
    def cost_aware_clock_rises_and_credits_stay_non_negative(self) -> None:
        policy = self.trie.policy
        if not isinstance(policy, CostAwarePolicy):
            return
        assert policy.clock >= self.clock
        self.clock = policy.clock
        for node in self._leaves():
            walk: TrieNode | None = node
            while walk is not None and walk is not self.trie.root:
                assert walk.score >= -1e-9
                assert walk.clock_at_access <= policy.clock
                walk = walk.parent

    @invariant()
    def locked_sequences_stay_whole(self) -> None:
        for node, seq in self.locks:
            assert node is self.trie.root or node.parent is not None
            assert self.trie.match(seq).matched_tokens == len(seq)
        assert self.trie.root.lock_ref == len(self.locks)


TrieMachine.TestCase.settings = settings(
    max_examples=500, deadline=None, stateful_step_count=30, database=None
)
TestTrieMachine = TrieMachine.TestCase


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(SEQUENCES, max_size=25), st.lists(SEQUENCES, max_size=10))
def test_stats_and_matches_agree_with_reference_without_eviction(
    inserted: list[Seq], queries: list[Seq]
) -> None:
    # Without eviction every node's hit_count is the number of inserted
    # sequences through it, and its times are the first and last of those.
    trie = RadixTrie(make_policy("lfu"))
    for at_s, seq in enumerate(inserted):
        expected = reference_match(inserted[:at_s], seq)
        assert trie.insert(list(seq), float(at_s)).matched_tokens == expected
        check_trie(trie)
    for query in [*inserted, *queries]:
        assert trie.match(query).matched_tokens == reference_match(inserted, query)
    stack = list(trie.root.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        path = tuple(trie.prefix_tokens(node))
        times = [float(t) for t, s in enumerate(inserted) if s[: len(path)] == path]
        assert node.hit_count == len(times)
        assert (node.first_seen_s, node.last_access_s) == (times[0], times[-1])
    # Each stored token is one distinct non-empty prefix of what was inserted.
    assert trie.num_tokens == len({s[:i] for s in inserted for i in range(1, len(s) + 1)})
    assert sorted(leaf_paths(trie)) == sorted(
        s for s in set(inserted) if s and not any(o != s and o[: len(s)] == s for o in inserted)
    )
