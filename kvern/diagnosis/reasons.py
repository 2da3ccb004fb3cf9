"""Why a request's prompt tokens were not reused: every token is reused or given a reason.

Why two parts: a prompt's tokens can be lost in two places. Past the
longest prefix any earlier prompt shared (the *prompt side*, what kvern's
trie shows), nothing could have been reused; before it, the backend may still
have dropped what kvern saw (the *backend side*: its cache, or another
upstream). Each side gets one reason, and the sum is exact::

    prompt_tokens == reused + lost_tokens (backend side) + miss_tokens + novel_tokens

Prompt side (``miss_reason``):

- ``cold``: no earlier prompt shares even its first token;
- ``below_block``: the shared part is shorter than one KV block (a backend
  caches whole blocks only);
- ``diverged``: an earlier prompt shares a prefix and then goes on with other
  tokens -- the request differs at token k where more could have been reused,
  up to where that earlier prompt ended (where k falls is
  :mod:`kvern.diagnosis.layout`'s business);

and past every earlier prompt's end, ``novel_tokens``: what nothing seen
before could have provided (a new turn's message, the last token a backend
always recomputes) -- nothing to fix, counted so the sum stays exact.

Backend side (``lost_reason``), the aligned shared prefix minus what was reused:

- ``routed_away``: another upstream held a longer prefix than the one the
  request went to;
- ``evicted``: kvern's trie still holds the prefix but the backend's cache
  (its report, or kvern's model of it) no longer does;
- ``unreported``: the backend gave no figure to check against, so these are
  kvern's own model's figure, unconfirmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

MissReason = Literal["cold", "below_block", "diverged"]
LostReason = Literal["evicted", "routed_away", "unreported"]
# Every reason, prompt side first, in the order reports list them.
REASONS: Final[tuple[str, ...]] = (
    "cold",
    "below_block",
    "diverged",
    "novel",
    "evicted",
    "routed_away",
    "unreported",
)


@dataclass(frozen=True, slots=True)
class Breakdown:
    """One request's prompt tokens: reused, or lost on one side or the other, with why."""

    reused: int
    miss_reason: MissReason | None  # None when the prompt side lost nothing
    miss_tokens: int
    lost_reason: LostReason | None  # None when the backend side lost nothing
    lost_tokens: int
    novel_tokens: int  # past every earlier prompt: nothing could have been reused


def assign(
    *,
    prompt_tokens: int,
    matched: int,
    block_size: int,
    continued: bool,
    reach: int = 0,
    predicted: int | None,
    reported: int | None,
    best_elsewhere: int = 0,
) -> Breakdown:
    """The breakdown of one request.

    ``matched``: prompt tokens kvern's trie held before this request;
    ``continued``: an earlier prompt went on past ``matched`` with other tokens,
    as far as ``reach`` tokens from the start (its length);
    ``predicted``/``reported``: cached tokens by kvern's model / the backend;
    ``best_elsewhere``: the longest prefix another upstream held (routing).
    """
    total = max(0, prompt_tokens)
    block = max(1, block_size)
    matched = min(max(0, matched), total)
    aligned = matched - matched % block
    if reported is not None:
        reused = reported
    elif predicted is not None:
        reused = predicted
    else:
        reused = aligned
    reused = min(max(0, reused), total)
    # The backend side: what kvern saw shared, block-aligned, that was not reused.
    lost = max(0, aligned - reused)
    lost_reason: LostReason | None = None
    if lost:
        if reported is None:
            lost_reason = "unreported"
        elif best_elsewhere > reused:
            lost_reason = "routed_away"
        else:
            lost_reason = "evicted"
    # The prompt side: past the shared prefix (or past what the backend reused, if more).
    start = max(reused, aligned)
    rest = total - start
    miss_reason: MissReason | None = None
    miss = 0
    if rest:
        if matched == 0:
            miss_reason, miss = "cold", rest
        elif aligned == 0:
            miss_reason, miss = "below_block", rest
        elif continued and matched < total:
            miss = max(0, min(total, max(reach, matched + 1)) - start)
            miss_reason = "diverged" if miss else None
    return Breakdown(reused, miss_reason, miss, lost_reason, lost, rest - miss)
