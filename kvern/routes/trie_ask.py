"""Asking the brain for a view of its tries: drain first (bounded), then one call.

Why shared: ``/trie/visualize`` and ``/trie/tree`` read the same tries in the
same way -- wait briefly for requests already answered to land, say in
``x-kvern-tracking-*`` headers what tracking still holds, and turn a brain
that does not answer the view into one clear 503 -- and differ only in what they ask.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response

from kvern.errors import TrackingUnavailable
from kvern.services import Services
from kvern.tracking.relay_view import BrainUnavailable, DrainState


async def ask_trie_view(
    services: Services,
    response: Response,
    wait_s: float | None,
    method: str,
    *args: Any,
    timeout_s: float,
) -> tuple[dict[str, Any], DrainState]:
    """The brain's answer to ``method(*args)`` once drained, and how far the drain got."""
    brain = services.tracker
    tracking = await brain.drain_state(wait_s)
    response.headers["x-kvern-tracking-drained"] = "true" if tracking.drained else "false"
    response.headers["x-kvern-tracking-pending"] = str(tracking.pending)
    # A late drain reply is not a dead brain: on a busy two-core machine a
    # tokenizer being built in the tracking process held the reply past its
    # 0.2 s margin (CI, a 503 from a brain that answered the next call). The
    # view is asked anyway, bounded by its own timeout; only no answer to it
    # is a 503.
    if tracking.error is not None:
        response.headers["x-kvern-tracking-error"] = tracking.error
    try:
        result: dict[str, Any] = await brain.call(method, *args, timeout_s=timeout_s)
    except BrainUnavailable as exc:
        raise TrackingUnavailable(f"the trie lives in kvern's tracking process: {exc}") from None
    return result, tracking
