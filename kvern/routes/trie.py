"""``GET /trie/visualize``: the hottest prefixes of each model's trie, as text.

The JSON shape follows the KVern seed:
``{"<model>": {"hot_prefixes": [{"text", "depth", "count", ...}], "display": "..."}}``
plus the trie's size. The tries live in the brain, which renders the answer
(:func:`kvern.tracking.views.describe`); this route asks for it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from kvern.errors import BadRequest, TrackingUnavailable
from kvern.services import Services
from kvern.tracking.client import BrainUnavailable

router = APIRouter()


@router.get("/trie/visualize")
async def visualize(
    request: Request,
    model: str | None = None,
    n: int = Query(10, ge=1, le=1000),
    min_depth: int = Query(0, ge=0),
) -> dict[str, Any]:
    services: Services = request.app.state.services
    brain = services.tracker
    # Requests already answered are in the trie first (bounded wait).
    await brain.drain(services.config.tracking.drain_timeout_s)
    try:
        result: dict[str, Any] = await brain.call("visualize", model, n, min_depth)
    except BrainUnavailable as exc:
        raise TrackingUnavailable(f"the trie lives in kvern's tracking process: {exc}") from None
    if "unknown" in result:
        raise BadRequest(f"no trie for model {model!r}; known: {result['unknown']}", param="model")
    models: dict[str, Any] = result["models"]
    return models
