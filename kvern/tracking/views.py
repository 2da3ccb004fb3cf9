"""What the brain shows people: a model's hot prefixes, decoded, and the tracking state.

Why here and not in the routes: these read the tries, the tokenizers and the
presence book, which live in the brain (see :mod:`kvern.tracking.brain`); the
endpoints ask for them by message and only render the answer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.forest import ModelTrie, TrieForest
from kvern.tracking.queue import TrackingQueue
from kvern.trie.report import hot_prefixes, measure

_HEAD_CHARS = 120
_TAIL_CHARS = 120


def truncate_middle(text: str, head: int = _HEAD_CHARS, tail: int = _TAIL_CHARS) -> str:
    """Keep the start (what the prefix is) and the end (where it stops being shared)."""
    if len(text) <= head + tail + 20:
        return text
    return f"{text[:head]} …[{len(text) - head - tail} chars]… {text[-tail:]}"


def _iso(ts_s: float) -> str:
    return dt.datetime.fromtimestamp(ts_s, tz=dt.timezone.utc).isoformat(timespec="seconds")


def describe(mt: ModelTrie, tok: ModelTokenizer | None, n: int, min_depth: int) -> dict[str, Any]:
    """Hot prefixes of one model with decoded text and a human-readable display."""
    stats = measure(mt.trie)
    prefixes = []
    lines = [
        f"{mt.model}: {stats.num_nodes} nodes, {stats.num_tokens} tokens held "
        f"(~{stats.estimated_bytes / 1e6:.1f} MB), budget {mt.max_tokens} tokens",
    ]
    for rank, hot in enumerate(hot_prefixes(mt.trie, n, min_depth), start=1):
        text = tok.decode(hot.tokens) if tok is not None else ""
        shown = truncate_middle(text)
        prefixes.append(
            {
                "text": shown,
                "depth": hot.depth,
                "count": hot.hit_count,
                "first_seen": _iso(hot.first_seen_s),
                "last_seen": _iso(hot.last_access_s),
                "text_chars": len(text),
                "truncated": shown != text,
            }
        )
        one_line = shown.replace("\n", "\\n")
        lines.append(f"{rank:>3}. depth {hot.depth:>6}  hits {hot.hit_count:>6}  {one_line}")
    return {
        "hot_prefixes": prefixes,
        "stats": {
            "nodes": stats.num_nodes,
            "tokens": stats.num_tokens,
            "estimated_bytes": stats.estimated_bytes,
            "max_tokens": mt.max_tokens,
            # Locks held (the root counts every one): requests in flight, plus
            # what a llama.cpp cache model keeps in its slots and RAM cache.
            # More than that, once the load stops, is a leak that pins paths.
            "locks": mt.trie.root.lock_ref,
            "block_size": mt.block_size,
        },
        "display": "\n".join(lines),
    }


async def visualize(
    tracker: TrackingQueue,
    forest: TrieForest,
    registry: TokenizerRegistry,
    model: str | None,
    n: int,
    min_depth: int,
) -> dict[str, Any]:
    """The brain's answer to /trie/visualize: :func:`describe` per model, read on its thread."""
    models = await tracker.in_thread(forest.models, urgent=True)
    waiting = tracker.waiting_for_tokenizer()
    if model is not None:
        if model not in models:
            return {"unknown": models, "waiting": waiting}
        models = [model]
    out: dict[str, Any] = {}
    for name in models:
        # A trie exists only once its model's tokenizer has loaded.
        tok = registry.loaded(name)
        out[name] = await tracker.in_thread(
            describe, forest.get(name), tok, n, min_depth, urgent=True
        )
    return {"models": out, "waiting": waiting}


def health_view(
    tokenizer_states: list[Any],
    stats: Any,
    backlog: int,
    presence: dict[str, dict[str, Any]],
    *,
    hub: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The brain's part of /health: tokenizers, the tokenizer hub, counters, modelled caches."""
    return {
        "tokenizer_hub": hub,
        "tokenizers": {
            s.model: {k: v for k, v in asdict(s).items() if k != "model"} for s in tokenizer_states
        },
        "tracking": {
            "tracked": stats.num_tracked,
            "skipped_backlog": stats.num_skipped_backlog,
            "untracked": stats.num_untracked,
            "backlog": backlog,
            "skipped": dict(stats.skipped),
            "errors": dict(stats.errors),
        },
        "presence": {
            model: {name: asdict(s) for name, s in per.items()} for model, per in presence.items()
        },
    }
