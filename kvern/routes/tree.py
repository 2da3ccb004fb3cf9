"""``GET /trie/tree``: the hottest part of one model's trie, as nodes of a tree.

Why beside ``/trie/visualize``: that one lists the hottest prefixes; this one
says how they hang together -- the spine every conversation shares and the
branches where they part -- which is what the dashboard draws. The tries
live in the brain, which builds the answer (:func:`kvern.tracking.tree_view.tree_of`).

Query: ``model`` (default: the model with the most requests), ``max_nodes``
(the most hit nodes kept, with their ancestors), ``min_hits``, ``wait_s`` (as
``/trie/visualize``: how long to wait for requests already answered to reach
the trie). The answer: ``model``, ``models`` (every model with a trie),
``nodes`` (parents before children), ``spine`` (ids), ``stats``, ``tracking``.
Decoded prompt text is user data; the route is mounted behind the admin key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from kvern.errors import BadRequest
from kvern.routes.trie_ask import ask_trie_view
from kvern.services import Services
from kvern.tracking.relay_view import MAX_DRAIN_WAIT_S

router = APIRouter()

# Decoding a few hundred prefixes on the tracking thread; the drain came first.
_TREE_TIMEOUT_S = 3.0


def _empty(model: str | None, models: list[str]) -> dict[str, Any]:
    """No tree (yet): no request tracked, or the model's tokenizer still loading."""
    return {
        "model": model,
        "models": models,
        "nodes": [],
        "spine": [],
        "requests": 0,
        "hidden_roots": 0,
        "stats": None,
        "truncated": False,
    }


@router.get("/trie/tree")
async def tree(
    request: Request,
    response: Response,
    model: str | None = None,
    max_nodes: int = Query(80, ge=1, le=2000),
    min_hits: int = Query(1, ge=0),
    wait_s: float | None = Query(None, ge=0, le=MAX_DRAIN_WAIT_S),
) -> dict[str, Any]:
    services: Services = request.app.state.services
    result, tracking = await ask_trie_view(
        services, response, wait_s, "tree", model, max_nodes, min_hits, timeout_s=_TREE_TIMEOUT_S
    )
    waiting: dict[str, int] = result.get("waiting", {})
    if "unknown" in result:
        if model is not None and model in waiting:
            return {
                **_empty(model, result["unknown"]),
                "tokenizer_loading": True,
                "tracking": tracking.to_dict(),
            }
        raise BadRequest(f"no trie for model {model!r}; known: {result['unknown']}", param="model")
    body = result["tree"] if result["tree"] is not None else _empty(None, [])
    return {
        **body,
        "models": result["models"],
        "tokenizer_loading": False,
        "tracking": tracking.to_dict(),
    }
