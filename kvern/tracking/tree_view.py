"""The hottest part of a model's trie as a tree: the shared spine and its branches.

Why a tree and not a list: ``/trie/visualize`` ranks prefixes one by one, but
what decides reuse is how they share -- a system prompt every conversation
goes through (the spine), then a branch per conversation, a twig per turn.
The dashboard draws that picture from these nodes.

Why here: the tries and tokenizers live in the brain (see
:mod:`kvern.tracking.brain`), and a trie is only touched from the tracking
thread, so :func:`tree_of` runs there, like :func:`kvern.tracking.views.describe`.

Bounded: at most ``max_nodes`` nodes, the most hit first (deeper last on a
tie). Every request through a node went through its ancestors as well, so an
ancestor always has at least its descendants' hits and ranks ahead of them:
the nodes kept always reach the root. Nodes holding only a cached answer
(``hit_count`` 0, see ``RadixTrie.insert(count_hit=False)``) fall under the
default ``min_hits`` of 1.
"""

from __future__ import annotations

import heapq
from typing import Any

from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tracking.forest import ModelTrie, TrieForest
from kvern.tracking.views import truncate_middle
from kvern.trie.node import TrieNode

# Characters of an edge's own text kept at each end (a long system prompt is
# one edge: its start says what it is, its end where the branches begin).
_EDGE_HEAD_CHARS = 400
_EDGE_TAIL_CHARS = 200
# Characters of the whole prefix kept at each end, for the hover.
_PREFIX_HEAD_CHARS = 200
_PREFIX_TAIL_CHARS = 200


def busiest_model(forest: TrieForest) -> str | None:
    """The model whose trie has counted the most requests; None before the first.

    The dashboard shows one tree at a time and starts with the one that
    carries most of the traffic.
    """
    best: tuple[int, str] | None = None
    for name in forest.models():
        mt = forest.peek(name)
        if mt is None:
            continue
        key = (mt.trie.root.hit_count, name)
        if best is None or key[0] > best[0]:
            best = key
    return best[1] if best is not None else None


def _kept(mt: ModelTrie, max_nodes: int, min_hits: int) -> list[TrieNode]:
    """The ``max_nodes`` most hit nodes with at least ``min_hits``, parents first."""
    candidates = (n for n in mt.trie.iter_nodes() if n.hit_count >= min_hits)
    top = heapq.nsmallest(max_nodes, candidates, key=lambda n: (-n.hit_count, n.depth))
    chosen = {id(n): n for n in top}
    root = mt.trie.root
    for node in top:
        # Ancestors rank first (see the module docstring), so this adds nothing;
        # it is what keeps every node shown reachable from the root regardless.
        walk = node.parent
        while walk is not None and walk is not root and id(walk) not in chosen:
            chosen[id(walk)] = walk
            walk = walk.parent
    return sorted(chosen.values(), key=lambda n: n.depth)  # a parent ends above its children


def _spine(nodes: list[TrieNode], root: TrieNode) -> list[TrieNode]:
    """From the root, the most hit child while more than half of all requests went through it.

    That is the prefix most requests share (a common system prompt); where
    it stops, the requests part ways into branches.
    """
    children: dict[int, list[TrieNode]] = {}
    for node in nodes:
        assert node.parent is not None
        children.setdefault(id(node.parent), []).append(node)
    total = root.hit_count
    path: list[TrieNode] = []
    here = root
    while True:
        below = children.get(id(here))
        if not below:
            return path
        best = max(below, key=lambda n: (n.hit_count, n.depth))
        if best.hit_count * 2 <= total:
            return path
        path.append(best)
        here = best


def tree_of(
    mt: ModelTrie, tok: ModelTokenizer | None, max_nodes: int, min_hits: int = 1
) -> dict[str, Any]:
    """The hottest part of ``mt``'s trie as nodes, parents before children.

    Each node: ``id`` (its index here), ``parent`` (None under the root),
    ``depth`` (tokens from the root to the end of its edge), ``edge_tokens``,
    ``hits``, ``text`` (its edge, decoded), ``prefix_text`` (root to here,
    decoded, the middle cut when long), ``hidden_children`` (children left out)
    and ``spine``. Texts are prompts, user data: whoever shows them escapes them.
    """
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
    trie = mt.trie
    root = trie.root
    nodes = _kept(mt, max_nodes, min_hits)
    spine = {id(n) for n in _spine(nodes, root)}
    ids: dict[int, int] = {}
    full_text: dict[int, str] = {id(root): ""}
    shown_children: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for node in nodes:
        parent = node.parent
        assert parent is not None
        shown_children[id(parent)] = shown_children.get(id(parent), 0) + 1
    for index, node in enumerate(nodes):
        parent = node.parent
        assert parent is not None
        ids[id(node)] = index
        if tok is not None:
            # Decoding the whole prefix keeps a character split across the
            # edge's first token whole; the edge's text is what it adds.
            text = tok.decode(trie.prefix_tokens(node))
            before = full_text[id(parent)]
            edge = text[len(before) :] if text.startswith(before) else tok.decode(node.key)
        else:
            text = edge = ""
        full_text[id(node)] = text
        out.append(
            {
                "id": index,
                "parent": ids.get(id(parent)),
                "depth": node.depth,
                "edge_tokens": node.num_tokens,
                "hits": node.hit_count,
                "text": truncate_middle(edge, _EDGE_HEAD_CHARS, _EDGE_TAIL_CHARS),
                "prefix_text": truncate_middle(text, _PREFIX_HEAD_CHARS, _PREFIX_TAIL_CHARS),
                "text_chars": len(edge),
                "first_seen_s": node.first_seen_s,
                "last_access_s": node.last_access_s,
                "hidden_children": len(node.children) - shown_children.get(id(node), 0),
                "spine": id(node) in spine,
            }
        )
    return {
        "model": mt.model,
        "nodes": out,
        "spine": [n["id"] for n in out if n["spine"]],
        "requests": root.hit_count,
        "hidden_roots": len(root.children) - shown_children.get(id(root), 0),
        "stats": {"nodes": trie.num_nodes, "tokens": trie.num_tokens, "shown": len(out)},
        "truncated": len(out) < trie.num_nodes,
        "max_nodes": max_nodes,
        "min_hits": min_hits,
        "decoded": tok is not None,
    }
