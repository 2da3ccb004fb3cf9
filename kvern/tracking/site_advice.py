"""Advice for the divergence sites ``/analytics`` shows, computed where the prompts are.

Why in the brain: a suggested rule is measured by replaying the site's
recent prompts (kept in memory by :class:`~kvern.tracking.divergence.SiteSamples`)
through the model's tokenizer, and both live here. The relay sends each
site's text windows from the analytics rows; the answer is plain data.

Why cached: a replay tokenizes a few dozen prompts on the tracking thread,
ahead of queued bookkeeping, and the dashboard asks every few seconds. A
site's advice is kept until the site gets a new sample (its prompts, and so
the rows' windows, moved on), so a page left open costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kvern.diagnosis.advice import advise
from kvern.diagnosis.layout import kind_of_place
from kvern.diagnosis.rules import Example
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tracking.divergence import SiteSamples
from kvern.tracking.forest import TrieForest

Asked = Sequence[tuple[str, str, str, Sequence[tuple[str, str, str]]]]


class SiteAdvisor:
    """Advice per (model, site), replayed once per change of its samples (tracking thread)."""

    def __init__(self, samples: SiteSamples, forest: TrieForest, max_entries: int) -> None:
        self._samples = samples
        self._forest = forest
        self._max_entries = max(1, max_entries)
        self._cache: OrderedDict[tuple[str, str, int, bool], dict[str, Any]] = OrderedDict()
        self.num_replays = 0  # advice computed (not served from the cache)

    def advise(
        self, asked: Asked, tokenizers: dict[str, ModelTokenizer | None]
    ) -> list[dict[str, Any]]:
        """Per ``(model, site, place, [(before, ours, theirs), ...])``: the advice, as a dict.

        A model with no tokenizer loaded gets its rule unmeasured.
        """
        out: list[dict[str, Any]] = []
        for model, site, place, windows in asked:
            tok = tokenizers.get(model)
            key = (model, site, self._samples.version(site), tok is not None)
            found = self._cache.get(key)
            if found is None:
                found = self._compute(model, site, place, windows, tok)
                self._cache[key] = found
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            out.append(found)
        return out

    def _compute(
        self,
        model: str,
        site: str,
        place: str,
        windows: Sequence[tuple[str, str, str]],
        tok: ModelTokenizer | None,
    ) -> dict[str, Any]:
        self.num_replays += 1
        mt = self._forest.peek(model)
        return advise(
            [Example(b, o, t) for b, o, t in windows],
            self._samples.get(site),
            place_kind=kind_of_place(place),
            tokenize=tok.encode_text if tok is not None else None,
            block_size=mt.block_size if mt is not None else 1,
        ).to_dict()
