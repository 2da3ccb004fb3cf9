"""A divergence, as one request's row records it, and the site it belongs to.

Why a site key: one cause (a request id in the system prompt, a date the
template injects) makes many requests part from the same shared prefix at
the same place. Requests whose prefix before the divergence is the same
token sequence and whose divergence falls in the same part of the prompt are
one site; the shared prefix is named by a hash of its token ids (never the
text), so rows can be grouped without storing the prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where a request parted from the earlier prompt it shared the most with."""

    at_token: int  # k: the first token that differs
    place: str  # where k falls, e.g. "message 3 (user)", "template text"
    place_kind: str  # "system", "tools", "message", "template", "prompt"
    prefix_id: str  # hash of the shared token ids before k
    before: str  # shared text just before k ("" when text is not kept)
    ours: str  # this request's text from k on
    theirs: str  # the earlier prompt's text from k on

    @property
    def site(self) -> str:
        """The site key: the shared prefix and the place."""
        return f"{self.prefix_id}:{self.place}"


def prefix_id(ids: Sequence[int], k: int) -> str:
    """A short stable name for the first ``k`` token ids."""
    data = array("i", ids[:k]).tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()
