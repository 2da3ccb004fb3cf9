"""Incremental tokenization: cache the token ids of rendered prompt segments.

Why: a chat client re-sends the whole conversation on every turn, so
tokenizing each request from scratch costs O(conversation) per turn and
O(turns^2) per conversation. But a HuggingFace fast tokenizer first splits its
input at *added tokens* (``<|im_end|>``, ``<|eot_id|>`` ...) and tokenizes the
pieces between them independently. Chat templates put such tokens at every
message boundary, so the rendered prompt falls into segments that tokenize the
same alone as inside the whole string::

    <|im_start|>system\\nYou are...<|im_end|> | \\n<|im_start|> | user\\nHi<|im_end|> | ...
    '------------- cached ------------------'   '--cached--'    '--- new text ---'

Each segment's ids are cached by its text, so a request costs about its *new*
text plus a regex scan and dictionary lookups.

The cache is bounded twice, least recently used segments going first: by the
token ids it keeps (``tokenizers.incremental_cache_tokens``) and by what it
costs in memory, the segments' text included (``incremental_cache_bytes``).
The text is most of it, and its size per token varies fourfold with the
script (Python keeps a string with one emoji at 4 bytes a character) and
more with repetitive text (one token for a run of characters), so a bound in
tokens alone let the cache keep growing well past what its size suggested,
long after the trie was full.

When is it exact? The scan must find the same added-token matches the
tokenizer finds (leftmost-longest over every added token that is matched on
raw text), and a boundary is only placed after a token that cannot absorb the
whitespace after it (``rstrip``). Tokenizers with ``single_word`` added tokens,
or whose pieces are not tokenized independently (a ``Metaspace`` that prepends
only to the first piece), cannot be guaranteed: a probe at construction
compares segmented and whole-string ids on text built around the tokenizer's
own special tokens, and a sampled check at run time keeps comparing. Either
one failing turns incremental tokenization off for that tokenizer, and kvern
tokenizes whole strings from then on.
"""

from __future__ import annotations

import logging
import re
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_PROBE_TEXTS = (
    "Hello world",
    " leading space",
    "\n\nTwo newlines then text\n",
    "  two spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n",
    "Ünïcödé — ñ 🦙 日本語",
    "numbers 1234567 and 3.14159",
    "'s 're it's they'll",
    "",
    " ",
    "\n",
)


# What a cache entry costs beyond its text and its ids: the ordered dict's
# slot, link and key hash (measured: 90-110 bytes on CPython 3.10-3.12).
_ENTRY_BYTES = 100


def entry_bytes(segment: str, ids: array[int]) -> int:
    """Memory a cached segment holds: its text, its ids and the entry (bytes)."""
    return sys.getsizeof(segment) + sys.getsizeof(ids) + _ENTRY_BYTES


@dataclass(slots=True)
class SegmentStats:
    """Counters of the incremental path."""

    num_requests: int = 0  # prompts tokenized
    num_segments: int = 0  # segments looked up
    num_segment_hits: int = 0  # segments found in the cache
    num_encoded_chars: int = 0  # characters actually sent to the tokenizer (the new text)
    num_verified: int = 0  # prompts also tokenized whole to check
    num_verify_skipped: int = 0  # samples too long to check (the next short one is)
    num_mismatches: int = 0  # checks that disagreed (turns the cache off)


class SegmentTokenizer:
    """Tokenizes rendered prompts segment by segment with a bounded cache."""

    def __init__(
        self,
        backend: Any,
        *,
        cache_tokens: int = 2_000_000,
        cache_bytes: int = 32 * 1024 * 1024,
        verify_every: int = 100,
        verify_max_chars: int = 200_000,
    ) -> None:
        """``backend`` is a ``tokenizers.Tokenizer`` (``hf_tokenizer.backend_tokenizer``).

        ``cache_tokens`` and ``cache_bytes`` bound the segment cache (see the
        module docstring); either one at 0 turns incremental tokenization off.

        ``verify_every``: tokenize every N-th prompt whole too and compare
        (0 disables; the first prompt is always checked). A sample longer
        than ``verify_max_chars`` is not tokenized whole (that would cost a
        huge prompt's whole tokenization again); the check moves to the next
        prompt short enough.
        """
        self._backend = backend
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._cache_tokens = 0
        self._cache_bytes = 0
        self._max_cache_tokens = cache_tokens
        self._max_cache_bytes = cache_bytes
        self._verify_every = verify_every
        self._verify_max_chars = verify_max_chars
        self._verify_due = False
        self.stats = SegmentStats()
        self.disabled_reason: str | None = None
        self._splitter: re.Pattern[str] | None = None
        self._boundary_tokens: frozenset[str] = frozenset()
        self._setup()

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def _disable(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.warning("incremental tokenization off: %s", reason)
        self.disabled_reason = reason
        self._cache.clear()
        self._cache_tokens = 0
        self._cache_bytes = 0

    def _setup(self) -> None:
        if self._max_cache_tokens <= 0 or self._max_cache_bytes <= 0:
            self.disabled_reason = "cache size is 0"
            return
        added = list(self._backend.get_added_tokens_decoder().values())
        raw = [t for t in added if not t.normalized and t.content]
        if any(t.single_word for t in added):
            self.disabled_reason = "tokenizer has single_word added tokens"
            return
        if not raw:
            self.disabled_reason = "tokenizer has no raw-text added tokens to split at"
            return
        contents = sorted({t.content for t in raw}, key=lambda c: (-len(c), c))
        # Longest first: Python's alternation is leftmost-first, this makes it
        # leftmost-longest, which is how the tokenizer matches added tokens.
        self._splitter = re.compile("|".join(re.escape(c) for c in contents))
        self._boundary_tokens = frozenset(t.content for t in raw if not t.rstrip)
        ok, detail = self._probe([t.content for t in raw if t.special] or contents)
        if not ok:
            self.disabled_reason = f"probe failed: {detail}"

    def _probe(self, specials: list[str]) -> tuple[bool, str]:
        """Compare segmented and whole ids on text woven around the special tokens."""
        chosen = specials[:8]
        # Words from the tokenizer's own vocabulary, so that a tokenizer whose
        # vocabulary knows none of the fixed probe texts is still exercised.
        vocab_size = self._backend.get_vocab_size(with_added_tokens=False)
        step = max(1, vocab_size // 48)
        words = [self._backend.decode([i]) for i in range(0, vocab_size, step)]
        texts = list(_PROBE_TEXTS) + [w for w in words if w] + [" " + w for w in words if w]
        pieces: list[str] = []
        for i, text in enumerate(texts):
            pieces.append(text)
            pieces.append(chosen[i % len(chosen)])
        probe = "".join(pieces)
        whole = self._encode_whole(probe)
        segmented = self._encode_segments(probe, use_cache=False)
        if list(segmented) != list(whole):
            first = next(
                (i for i, (a, b) in enumerate(zip(segmented, whole, strict=False)) if a != b),
                min(len(segmented), len(whole)),
            )
            return False, f"ids differ at position {first}"
        return True, ""

    def _encode_whole(self, text: str) -> array[int]:
        return array("i", self._backend.encode(text, add_special_tokens=False).ids)

    def split(self, text: str) -> list[str]:
        """Cut ``text`` after every boundary token; the pieces join back to ``text``."""
        assert self._splitter is not None
        segments: list[str] = []
        start = 0
        boundary = self._boundary_tokens
        for m in self._splitter.finditer(text):
            if m.group() in boundary:
                segments.append(text[start : m.end()])
                start = m.end()
        if start < len(text):
            segments.append(text[start:])
        return segments

    def _encode_segments(self, text: str, *, use_cache: bool) -> array[int]:
        segments = self.split(text)
        out = array("i")
        if not use_cache:
            for enc in self._backend.encode_batch(segments, add_special_tokens=False):
                out.extend(array("i", enc.ids))
            return out
        cache = self._cache
        found: list[array[int] | None] = []
        missing: list[str] = []
        for seg in segments:
            ids = cache.get(seg)
            if ids is not None:
                cache.move_to_end(seg)
            else:
                missing.append(seg)
            found.append(ids)
        self.stats.num_segments += len(segments)
        self.stats.num_segment_hits += len(segments) - len(missing)
        if missing:
            unique = list(dict.fromkeys(missing))
            self.stats.num_encoded_chars += sum(map(len, unique))
            encoded = self._backend.encode_batch(unique, add_special_tokens=False)
            fresh = {seg: array("i", enc.ids) for seg, enc in zip(unique, encoded, strict=False)}
            for seg, ids in fresh.items():
                cache[seg] = ids
                self._cache_tokens += len(ids)
                self._cache_bytes += entry_bytes(seg, ids)
            while cache and (
                self._cache_tokens > self._max_cache_tokens
                or self._cache_bytes > self._max_cache_bytes
            ):
                old_seg, old = cache.popitem(last=False)
                self._cache_tokens -= len(old)
                self._cache_bytes -= entry_bytes(old_seg, old)
            for i, seg in enumerate(segments):
                if found[i] is None:
                    found[i] = fresh[seg]
        for ids in found:
            assert ids is not None
            out.extend(ids)
        return out

    def encode(self, text: str) -> tuple[array[int], bool]:
        """Return (ids, used_incremental) for a rendered prompt (no special tokens added)."""
        if not self.enabled:
            return self._encode_whole(text), False
        self.stats.num_requests += 1
        ids = self._encode_segments(text, use_cache=True)
        n = self.stats.num_requests
        due = self._verify_due or n == 1 or (self._verify_every and n % self._verify_every == 0)
        if self._verify_every and due and len(text) > self._verify_max_chars:
            self._verify_due = True
            self.stats.num_verify_skipped += 1
        elif self._verify_every and due:
            self._verify_due = False
            self.stats.num_verified += 1
            whole = self._encode_whole(text)
            if whole != ids:
                self.stats.num_mismatches += 1
                self._disable("a sampled prompt tokenized differently in segments")
                return whole, False
        return ids, True

    def segment_at(self, text: str, k: int) -> tuple[int, int] | None:
        """(character, token) where the segment holding token ``k`` of ``text`` starts.

        From the segments' cached ids, without encoding or decoding anything
        before it: where a divergence falls in a long prompt costs a decode
        of one segment, not of the whole prefix. None when incremental
        tokenization is off or a segment is no longer cached.
        """
        if not self.enabled:
            return None
        chars = tokens = 0
        for seg in self.split(text):
            ids = self._cache.get(seg)
            if ids is None:
                return None
            if tokens + len(ids) > k:
                return chars, tokens
            chars += len(seg)
            tokens += len(ids)
        return chars, tokens

    @property
    def cached_tokens(self) -> int:
        """Token ids the cache keeps."""
        return self._cache_tokens

    @property
    def cached_bytes(self) -> int:
        """Memory the cache holds, text and ids included (an estimate, see :func:`entry_bytes`)."""
        return self._cache_bytes
