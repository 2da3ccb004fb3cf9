"""Advice for the divergence sites ``/analytics`` shows, computed where the prompts are.

Why in the brain: a suggested rule is measured by replaying the site's
recent prompts (kept in memory by :class:`~kvern.tracking.divergence.SiteSamples`)
through the model's tokenizer, and both live here. The relay sends each
site's text windows from the analytics rows; the answer is plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvern.diagnosis.advice import advise
from kvern.diagnosis.layout import kind_of_place
from kvern.diagnosis.rules import Example
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tracking.divergence import SiteSamples
from kvern.tracking.forest import TrieForest


def advise_sites(
    asked: Sequence[tuple[str, str, str, Sequence[tuple[str, str, str]]]],
    samples: SiteSamples,
    forest: TrieForest,
    tokenizers: dict[str, ModelTokenizer | None],
) -> list[dict[str, Any]]:
    """Per ``(model, site, place, [(before, ours, theirs), ...])``: the advice, as a dict.

    Runs on the tracking thread (the tokenizers' caches and the samples are
    its own); a model with no tokenizer loaded gets its rule unmeasured.
    """
    out: list[dict[str, Any]] = []
    for model, site, place, windows in asked:
        tok = tokenizers.get(model)
        mt = forest.peek(model)
        advice = advise(
            [Example(b, o, t) for b, o, t in windows],
            samples.get(site),
            place_kind=kind_of_place(place),
            tokenize=tok.encode_text if tok is not None else None,
            block_size=mt.block_size if mt is not None else 1,
        )
        out.append(advice.to_dict())
    return out
