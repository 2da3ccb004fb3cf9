"""Finding, beside each insert, whether and where a prompt parted from an earlier one.

Why at insert: the trie just walked the prompt, and the node where the new
leaf hangs is the divergence -- if that node has other children, an earlier
prompt went on with other tokens (``diverged``); if not, the request only
goes past what was seen (``novel``). How far the earlier prompt went (its
most-hit path down to a leaf) is what the divergence cost at most. Only a
diverged request pays for more (decoding its prefix to find where the
divergence falls in the text, a render without tools); the rest is a look at
one node. Runs on the tracking thread, like every trie access.

A few recent prompts per site are kept in memory (bounded by
``diagnosis.*``) so a suggested rule can be replayed over them on request.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from kvern.config import DiagnosisConfig
from kvern.diagnosis.continuation import continuation
from kvern.diagnosis.layout import Place, Span, message_spans, place_of, tools_spans
from kvern.diagnosis.replay import Sample
from kvern.diagnosis.sites import Divergence, prefix_id
from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.trie.records import InsertResult

# Tokens of the earlier prompt decoded for its side of the window, at most.
_THEIR_TOKENS = 64
# Tokens a divergence is moved back, at most, to the start of its word.
_MAX_BACKOFF = 16


@dataclass(frozen=True, slots=True)
class Finding:
    """What one insert says about the prompt's divergence."""

    continued: bool  # an earlier prompt went on past the match with other tokens
    reach: int  # how far (tokens from the start) that earlier prompt went
    divergence: Divergence | None = None  # where, when it diverged past a shared prefix


class SiteSamples:
    """Recent prompts per divergence site, least recently seen site dropped first."""

    def __init__(self, max_sites: int, per_site: int, max_chars: int) -> None:
        self._max_sites = max_sites
        self._per_site = per_site
        self._max_chars = max_chars
        self._sites: OrderedDict[str, deque[Sample]] = OrderedDict()
        self._added = 0  # samples ever added: a site's answer is reused until it moves
        self._versions: dict[str, int] = {}

    def add(self, site: str, text: str, diverge_char: int) -> None:
        if self._per_site == 0:
            return
        samples = self._sites.get(site)
        if samples is None:
            samples = self._sites[site] = deque(maxlen=self._per_site)
            while len(self._sites) > self._max_sites:
                gone, _ = self._sites.popitem(last=False)
                self._versions.pop(gone, None)
        else:
            self._sites.move_to_end(site)
        samples.append(Sample(text[: self._max_chars], diverge_char))
        self._added += 1
        self._versions[site] = self._added

    def version(self, site: str) -> int:
        """Changes whenever the site gets a sample (0: none kept)."""
        return self._versions.get(site, 0) if site in self._sites else 0

    def get(self, site: str) -> list[Sample]:
        return list(self._sites.get(site, ()))

    def __len__(self) -> int:
        return len(self._sites)


def word_start(tok: ModelTokenizer, ids: Any, k: int) -> int:
    """The token where the word holding token ``k`` starts (``k`` itself at a word's start).

    Two ids that begin alike ("2ee4..." and "2ab1...") part a token or two
    into the word; the site is where the word begins, so one cause is one
    site whatever its values share by chance.
    """
    start = k
    while start > 0 and k - start < _MAX_BACKOFF:
        piece = tok.decode(ids[start - 1 : start])
        if not piece or not piece[-1].isalnum():
            break
        start -= 1
        if not piece[0].isalnum():
            break  # this token begins the word (" e9", "-4d68" stops earlier)
    if start > 0:
        # A tokenizer that splits digits keeps the space before a number apart:
        # one site still. Not a newline: that is where a message (or the
        # template's text) ends, and the site would move out of the message.
        piece = tok.decode(ids[start - 1 : start])
        if piece.isspace() and "\n" not in piece:
            start -= 1
    return start


class DivergenceFinder:
    """Per insert: continued or not, how far, and for a divergence, where (tracking thread)."""

    def __init__(self, config: DiagnosisConfig) -> None:
        self._config = config
        self.samples = SiteSamples(
            config.max_sites, config.samples_per_site, config.max_sample_chars
        )

    def find(self, tok: ModelTokenizer, prompt: PromptTokens, result: InsertResult) -> Finding:
        matched = result.matched_tokens
        cont = continuation(result, _THEIR_TOKENS)
        if not cont.continued or matched == 0 or not self._config.enabled:
            return Finding(cont.continued, cont.reach)
        return Finding(True, cont.reach, self._locate(tok, prompt, matched, cont.theirs))

    def _locate(
        self, tok: ModelTokenizer, prompt: PromptTokens, k: int, theirs_ids: list[int]
    ) -> Divergence:
        start = word_start(tok, prompt.ids, k)
        if start < k:
            # The shared tokens of the word the divergence is in are the other side's too.
            theirs_ids = list(prompt.ids[start:k]) + theirs_ids
            k = start
        text = prompt.text
        char = tok.char_of_token(text, prompt.ids, k)
        place = self._place(tok, prompt, char)
        width = self._config.window_chars
        before = ours = theirs = ""
        if width:
            # Inside a message, the text before stops at the message's start: a
            # rule for it applies to the message's text alone (scope messages),
            # so its anchor must not reach into the template's text.
            inside = place.offset if place.kind in ("system", "message") else width
            before = text[max(0, char - min(width, inside)) : char]
            ours = text[char : char + width]
            theirs = tok.decode(theirs_ids)[:width]
        found = Divergence(
            at_token=k,
            place=place.describe(),
            place_kind=place.kind,
            prefix_id=prefix_id(prompt.ids, k),
            before=before,
            ours=ours,
            theirs=theirs,
        )
        self.samples.add(found.site, text, char)
        return found

    def _place(self, tok: ModelTokenizer, prompt: PromptTokens, char: int) -> Place:
        if prompt.messages is None:
            return Place("prompt", offset=char)
        spans: list[Span] = message_spans(prompt.text, prompt.messages)
        if prompt.tools:
            spans.extend(tools_spans(prompt.text, tok.render_without_tools(prompt.messages)))
        return place_of(char, spans)
