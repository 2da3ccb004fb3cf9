"""``GET /trie/visualize``: the hottest prefixes of each model's trie, as text.

The JSON shape follows the KVern seed:
``{"<model>": {"hot_prefixes": [{"text", "depth", "count", ...}], "display": "..."}}``
plus the trie's size. The tries live in the brain, which renders the answer
(:func:`kvern.tracking.views.describe`); this route asks for it.

It waits briefly (``wait_s``, default ``tracking.drain_timeout_s``) for
requests already answered to reach the trie, then shows what is there; what
tracking still holds goes in the ``x-kvern-tracking-*`` headers (the body's
keys are model names), and a model asked for by name whose tokenizer is
still loading is shown as such rather than refused as unknown.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from kvern.errors import BadRequest
from kvern.routes.trie_ask import ask_trie_view
from kvern.services import Services
from kvern.tracking.relay_view import MAX_DRAIN_WAIT_S

router = APIRouter()

# Once drained (or not), the brain renders from what it holds: this is plenty.
_VIEW_TIMEOUT_S = 1.0


def _loading(model: str, num_waiting: int) -> dict[str, Any]:
    """The entry of a model whose requests wait for its tokenizer: no trie yet."""
    return {
        "hot_prefixes": [],
        "stats": None,
        "display": f"{model}: tokenizer still loading; {num_waiting} tracking job(s) "
        "run once it lands",
        "tokenizer_loading": True,
    }


@router.get("/trie/visualize")
async def visualize(
    request: Request,
    response: Response,
    model: str | None = None,
    n: int = Query(10, ge=1, le=1000),
    min_depth: int = Query(0, ge=0),
    wait_s: float | None = Query(None, ge=0, le=MAX_DRAIN_WAIT_S),
) -> dict[str, Any]:
    services: Services = request.app.state.services
    # Requests already answered are in the trie first (bounded wait).
    result, _ = await ask_trie_view(
        services, response, wait_s, "visualize", model, n, min_depth, timeout_s=_VIEW_TIMEOUT_S
    )
    waiting: dict[str, int] = result.get("waiting", {})
    if "unknown" in result:
        if model is not None and model in waiting:
            return {model: _loading(model, waiting[model])}
        raise BadRequest(f"no trie for model {model!r}; known: {result['unknown']}", param="model")
    models: dict[str, Any] = result["models"]
    return models
