"""``/analytics``' ``misses``: the costliest divergence sites, each with its advice.

Why a module: the sites come from the analytics rows (the relay's store),
the measured advice from the brain (which holds the sites' recent prompts
and the tokenizers: see :mod:`kvern.tracking.site_advice`). A brain that
does not answer in time still leaves the rule, unmeasured, and says why.
"""

from __future__ import annotations

from typing import Any, Final

from kvern.analytics import misses
from kvern.analytics.store import AnalyticsStore
from kvern.diagnosis.advice import advise
from kvern.diagnosis.layout import kind_of_place
from kvern.diagnosis.rules import Example, marked
from kvern.tracking.client import BrainClient
from kvern.tracking.relay_view import BrainUnavailable

# Sites shown by default, and how long their advice is waited for.
TOP_SITES: Final = 10
ADVICE_TIMEOUT_S: Final = 5.0
# Examples shown per site (side by side).
_SHOWN = 2


def _windows(site: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["before"], e["ours"], e["theirs"]) for e in site["examples"]]


async def misses_view(
    store: AnalyticsStore,
    brain: BrainClient,
    *,
    window: str,
    model: str | None,
    now_s: float,
    top: int = TOP_SITES,
    silent: str | None = None,
) -> list[dict[str, Any]]:
    """The top sites with two marked examples each and the advice for each.

    ``silent``: why the brain did not answer just before; the rules are then
    given unmeasured at once instead of waiting for it again.
    """
    found = await misses.sites(store, window=window, model=model, now_s=now_s, top=top)
    if not found:
        return []
    asked = [(s["model"], s["site"], s["place"], _windows(s)) for s in found]
    advice: list[dict[str, Any]] | None = None
    why = f"not measured: {silent}" if silent is not None else ""
    if silent is None:
        try:
            answer = await brain.call("advise_sites", asked, timeout_s=ADVICE_TIMEOUT_S)
            if isinstance(answer, list) and len(answer) == len(found):
                advice = answer
        except BrainUnavailable as exc:
            why = f"not measured: {exc}"
    for index, site in enumerate(found):
        if advice is not None:
            site["advice"] = advice[index]
        else:
            examples = [Example(b, o, t) for b, o, t in _windows(site)]
            unmeasured = advise(
                examples, [], place_kind=kind_of_place(site["place"]), tokenize=None, block_size=1
            ).to_dict()
            unmeasured["note"] = why or unmeasured["note"]
            site["advice"] = unmeasured
        shown = site["examples"][:_SHOWN]
        for example in shown:
            example["ours_marked"], example["theirs_marked"] = marked(
                Example(example["before"], example["ours"], example["theirs"])
            )
        site["examples"] = shown
    return found
