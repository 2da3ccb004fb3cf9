"""The live capacity curve: every tracked prompt fed, per model, to a bounded Mattson pass.

Why in the brain: the prompt token ids exist only there, once per request,
on the tracking thread; feeding them to a
:class:`~kvern.diagnosis.capacity.StackDistanceCurve` as they go costs two
dict operations and one blake2b call per block, and ``/analytics`` can then
say how much KV cache this traffic needs, from kvern's own traffic, at no
extra pass over anything.

Bounded for a process that runs for months: each model's curve tracks at
most ``tracking.capacity_curve_max_blocks`` distinct blocks (about 270 bytes
each, allocated as blocks are seen; the default 262,144 is about 70 MB for
a model with that much distinct traffic) and is exact for capacities up to
that many blocks; the points above it are marked ``exact: false`` (lower
bounds). Models are already bounded by ``tracking.max_models``. The curve
counts since the tracking process started (it is not windowed, and a
restarted brain starts again).

Prompts only, as the trie has them, of requests that reached their upstream
(``insert``): a backend that refused one cached nothing.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvern.diagnosis.capacity import StackDistanceCurve

logger = logging.getLogger(__name__)

# The smallest block the live curve hashes: a 1-token block (llama.cpp's cache
# is token-granular) would cost a blake2b call per prompt token on the
# tracking thread; at 16 tokens it is ~30 ns a token, and a capacity curve
# loses nothing a planner needs by counting reuse in 16-token steps.
MIN_BLOCK_TOKENS = 16


class CapacityCurves:
    """Model name -> its live curve; only ever touched from the tracking thread."""

    def __init__(
        self,
        block_size_of: Callable[[str], int],
        *,
        max_blocks: int,
        kv_bytes_per_token: Mapping[str, int] | None = None,
    ) -> None:
        """``block_size_of(model)``: the block size of the model's trie (read on first use).

        ``kv_bytes_per_token``: model name or glob -> KV bytes a token, for GiB.
        """
        self._block_size_of = block_size_of
        self._max_blocks = max_blocks
        self._kv_bytes = dict(kv_bytes_per_token or {})
        self._curves: dict[str, StackDistanceCurve] = {}
        self.num_errors = 0  # prompts the curve failed on (logged once)

    def observe(self, model: str, ids: Sequence[int]) -> None:
        """One tracked prompt of ``model`` (the tracker's ``on_prompt``); never raises.

        It runs inside the request's prediction: a failure here must cost the
        curve one prompt, never the request its row.
        """
        try:
            self._observe(model, ids)
        except Exception:  # noqa: BLE001 - the curve is a side view of tracking
            self.num_errors += 1
            if self.num_errors == 1:
                logger.exception("capacity curve: a prompt of %s could not be counted", model)

    def _observe(self, model: str, ids: Sequence[int]) -> None:
        curve = self._curves.get(model)
        if curve is None:
            curve = StackDistanceCurve(
                max(MIN_BLOCK_TOKENS, self._block_size_of(model)),
                max_blocks=self._max_blocks,
                kv_bytes_per_token=self._kv_bytes_for(model),
            )
            self._curves[model] = curve
        curve.add(ids)

    def _kv_bytes_for(self, model: str) -> int | None:
        for pattern, value in self._kv_bytes.items():
            if model == pattern or fnmatch.fnmatchcase(model, pattern):
                return value
        return None

    def curve(self, model: str) -> StackDistanceCurve | None:
        return self._curves.get(model)

    def view(self, model: str | None = None) -> dict[str, Any]:
        """``/analytics``' ``capacity_curve``: per model, its points and what bounds them."""
        names = sorted(self._curves) if model is None else [model]
        out: dict[str, Any] = {}
        for name in names:
            curve = self._curves.get(name)
            if curve is None:
                continue
            bound = curve.max_blocks
            out[name] = {
                "block_size": curve.block_size,
                "requests": curve.num_requests,
                "prompt_tokens": curve.total_tokens,
                "distinct_blocks": curve.distinct_blocks,
                "tracked_blocks": curve.tracked_blocks,
                "forgotten_blocks": curve.num_forgotten,
                "max_blocks": bound,
                # Capacities up to this are exact; above it, lower bounds.
                "exact_up_to_tokens": bound * curve.block_size if bound is not None else None,
                "kv_bytes_per_token": curve.kv_bytes_per_token,
                "points": [p.to_dict() for p in curve.curve()],
            }
        return {"models": out, "errors": self.num_errors}
