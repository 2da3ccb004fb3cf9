"""The trie's invariant recount, for tests after every mutation.

Why a separate module: it is verification, not the data structure. Like
sgl-router's tree tests (``test_tenant_char_count``), it recounts from scratch
everything :class:`~kvern.trie.radix.RadixTrie` keeps incrementally -- node and
token counters, parent links, depths, hit counts, lock counts, recency -- so a
bookkeeping slip in a split or an eviction fails loudly at the step that
caused it.
"""

from __future__ import annotations

from kvern.trie.radix import RadixTrie


def check_trie(trie: RadixTrie) -> None:
    """Raise AssertionError, naming the node, on the first mismatch found."""
    root = trie.root
    if len(root.key) != 0 or root.parent is not None or root.depth != 0:
        raise AssertionError("root must have an empty key, no parent and depth 0")
    num_nodes = 0
    num_tokens = 0
    for node in (root, *trie.iter_nodes()):
        if node is not root:
            num_nodes += 1
            num_tokens += len(node.key)
        hits = 0
        locks = 0
        latest_s = float("-inf")
        for first, child in node.children.items():
            where = f"child {first} of node at depth {node.depth}"
            if len(child.key) == 0:
                raise AssertionError(f"{where} has an empty key")
            if child.key[0] != first:
                raise AssertionError(f"{where} has key starting {child.key[0]}")
            if child.parent is not node:
                raise AssertionError(f"{where} does not point back to its parent")
            if child.depth != node.depth + len(child.key):
                raise AssertionError(
                    f"{where} has depth {child.depth}, expected {node.depth + len(child.key)}"
                )
            hits += child.hit_count
            locks += child.lock_ref
            latest_s = max(latest_s, child.last_access_s)
        where = f"node at depth {node.depth}"
        if node.hit_count < hits:
            raise AssertionError(f"{where}: hit_count {node.hit_count} < children's {hits}")
        if node.lock_ref < 0 or node.lock_ref < locks:
            raise AssertionError(f"{where}: lock_ref {node.lock_ref} < children's {locks}")
        if node.last_access_s < latest_s:
            raise AssertionError(
                f"{where}: last_access_s {node.last_access_s} older than a child's {latest_s}"
            )
    if num_nodes != trie.num_nodes:
        raise AssertionError(f"num_nodes counter {trie.num_nodes} != recount {num_nodes}")
    if num_tokens != trie.num_tokens:
        raise AssertionError(f"num_tokens counter {trie.num_tokens} != recount {num_tokens}")
