"""An approximate tokenizer for models whose real tokenizer cannot be loaded.

Why: tracking must never stop because a tokenizer is gated, offline or simply
unknown. Prefix *structure* survives any deterministic tokenization: two
prompts that share their first N characters share roughly their first
N/4 pieces here, so hit rates and hot prefixes stay meaningful. Token *counts*
are only approximate (about one piece per short word or 4-6 characters, in
line with BPE vocabularies on English text), and every figure produced with it
is labelled ``fallback``.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections.abc import Iterable

# Leading space joins the following word, as in GPT-style BPE; long words and
# digit runs are cut into short pieces the way BPE cuts rare words.
_PIECE = re.compile(r" ?[^\W\d_]{1,6}| ?\d{1,3}| ?[^\w\s]{1,3}|\s*\n|\s+(?!\S)|\s+")
_ID_SPACE = 1 << 30


class ApproximateTokenizer:
    """Stable pseudo token ids: a CRC32 of each piece, deterministic across runs.

    It remembers the text of up to ``max_pieces`` distinct pieces so hot
    prefixes can still be shown as text.
    """

    def __init__(self, max_pieces: int = 200_000) -> None:
        self._pieces: dict[int, str] = {}
        self._max_pieces = max_pieces

    def encode(self, text: str) -> array[int]:
        pieces = _PIECE.findall(text)
        ids = array("i", (zlib.crc32(p.encode("utf-8")) % _ID_SPACE for p in pieces))
        if len(self._pieces) < self._max_pieces:
            self._pieces.update(zip(ids, pieces, strict=False))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._pieces.get(i, "\ufffd") for i in ids)
