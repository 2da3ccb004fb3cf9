"""``GET /trie/visualize``: the hottest prefixes of each model's trie, as text.

The JSON shape follows the KVern seed:
``{"<model>": {"hot_prefixes": [{"text", "depth", "count", ...}], "display": "..."}}``
plus the trie's size. The trie is read on the tracking thread, where it lives.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Query, Request

from kvern.errors import BadRequest
from kvern.services import Services
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tracking.forest import ModelTrie
from kvern.trie.report import hot_prefixes, measure

router = APIRouter()

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
            "block_size": mt.block_size,
        },
        "display": "\n".join(lines),
    }


@router.get("/trie/visualize")
async def visualize(
    request: Request,
    model: str | None = None,
    n: int = Query(10, ge=1, le=1000),
    min_depth: int = Query(0, ge=0),
) -> dict[str, Any]:
    services: Services = request.app.state.services
    await services.tracker.drain()  # requests already answered are in the trie
    models = await services.tracker.in_thread(services.forest.models)
    if model is not None:
        if model not in models:
            raise BadRequest(f"no trie for model {model!r}; known: {models}", param="model")
        models = [model]
    out: dict[str, Any] = {}
    for name in models:
        tok = await services.registry.get(name)
        mt = services.forest.get(name)
        out[name] = await services.tracker.in_thread(describe, mt, tok, n, min_depth)
    return out
