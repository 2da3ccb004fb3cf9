"""What a suggested rule would have saved, measured, and what else it would have rewritten.

Why replay and not estimate: a rule's worth is the reuse it adds, which
depends on every prompt of the site in the order they came. The site's
prompts go through a scratch trie twice, as they are and with the rule
applied, and the difference in block-aligned shared prefix is the rule's
saving -- computed, not guessed. A rule must also not merge prompts that
differ in meaning somewhere else: every match away from the divergence is
listed, and one whose matched text varies between prompts makes the rule
unsafe (it would make different content look the same).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvern.diagnosis.continuation import continuation
from kvern.diagnosis.reasons import assign
from kvern.trie import RadixTrie

# Examples of other rewrites kept per replay.
_MAX_OTHERS = 5
# Characters after a divergence within which a match is the site's own.
_NEAR = 16


@dataclass(frozen=True, slots=True)
class Sample:
    """One prompt of a site, as kvern rendered it, and where it diverged (characters)."""

    text: str
    diverge_char: int


@dataclass(slots=True)
class Replay:
    """A rule replayed over a site's prompts."""

    requests: int = 0
    prompt_tokens: int = 0
    reused_before: int = 0  # block-aligned shared prefix tokens, as the prompts were
    reused_after: int = 0  # the same with the rule applied
    diverged_before: int = 0  # tokens lost to divergences, as the prompts were
    diverged_after: int = 0  # the same with the rule applied
    other_rewrites: int = 0  # matches away from the divergence
    others: list[str] = field(default_factory=list)  # a few of them, with context
    merges_beyond_span: bool = False  # some of those differ between prompts

    @property
    def saved_tokens(self) -> int:
        return self.reused_after - self.reused_before

    @property
    def recovered_share(self) -> float | None:
        """Of the tokens lost to divergences before, the share the rule brings back."""
        if self.diverged_before <= 0:
            return None
        return 1.0 - self.diverged_after / self.diverged_before

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "reused_before": self.reused_before,
            "reused_after": self.reused_after,
            "saved_tokens": self.saved_tokens,
            "diverged_before": self.diverged_before,
            "diverged_after": self.diverged_after,
            "recovered_share": self.recovered_share,
            "other_rewrites": self.other_rewrites,
            "other_examples": list(self.others),
            "merges_beyond_span": self.merges_beyond_span,
        }


def reuse(
    texts: Sequence[str], tokenize: Callable[[str], Sequence[int]], block_size: int
) -> tuple[int, int, int]:
    """(prompt tokens, block-aligned tokens shared with an earlier prompt, diverged tokens).

    Diverged tokens are the prompt side's ``diverged`` share of
    :func:`~kvern.diagnosis.reasons.assign` with the backend taken to keep
    everything: what parting from an earlier prompt cost, novel text apart.
    """
    trie = RadixTrie()
    total = shared = diverged = 0
    for now, text in enumerate(texts):
        ids = tokenize(text)
        result = trie.insert(ids, float(now))
        cont = continuation(result)
        aligned = RadixTrie.aligned(result.matched_tokens, block_size)
        b = assign(
            prompt_tokens=len(ids),
            matched=result.matched_tokens,
            block_size=block_size,
            continued=cont.continued,
            reach=cont.reach,
            predicted=aligned,
            reported=aligned,
        )
        total += len(ids)
        shared += aligned
        diverged += b.miss_tokens if b.miss_reason == "diverged" else 0
    return total, shared, diverged


def replay(
    samples: Sequence[Sample],
    pattern: str,
    replacement: str,
    tokenize: Callable[[str], Sequence[int]],
    block_size: int,
) -> Replay:
    """Replay ``samples`` with and without the rule ``pattern -> replacement``."""
    regex = re.compile(pattern)
    out = Replay(requests=len(samples))
    rewritten: list[str] = []
    elsewhere: dict[str, set[str]] = {}  # context before a match away from the site -> texts
    for sample in samples:
        matches = list(regex.finditer(sample.text))
        # The site's own value: the match at the divergence (which may sit on
        # the space or the shared first characters just before it).
        here = {
            m.group(0)
            for m in matches
            if m.end() > sample.diverge_char and m.start() <= sample.diverge_char + _NEAR
        }
        for m in matches:
            if m.group(0) in here:
                continue  # the site's own value, here or repeated (the same id twice)
            out.other_rewrites += 1
            context = sample.text[max(0, m.start() - 24) : m.start()]
            elsewhere.setdefault(context, set()).add(m.group(0))
            if len(out.others) < _MAX_OTHERS:
                out.others.append(f"…{context}[{m.group(0)}]…")
        rewritten.append(regex.sub(replacement, sample.text))
    # The same place (same text before it) with different values: different content merged.
    out.merges_beyond_span = any(len(values) > 1 for values in elsewhere.values())
    out.prompt_tokens, out.reused_before, out.diverged_before = reuse(
        [s.text for s in samples], tokenize, block_size
    )
    _, out.reused_after, out.diverged_after = reuse(rewritten, tokenize, block_size)
    return out
