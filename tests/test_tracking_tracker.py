"""Tracker: what one request leaves behind once it is settled, whatever its answer held.

A request's prompt is locked in the trie from its first byte until its answer
is settled; a lock that is never released pins that path for ever (the trie
can no longer evict it, so it grows past its cap), and llama.cpp's modelled
slot stays busy. These drive the real tracker with the real Llama 3 tokenizer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvern.analytics.records import RequestRecord
from kvern.config import parse_config
from kvern.tokenize.registry import TokenizerRegistry
from kvern.tracking.forest import TrieForest
from kvern.tracking.records import Outcome, RequestContext
from kvern.tracking.tracker import Tracker
from kvern.tracking.views import describe
from tests.assets import TokenizerFixture

MODEL = "llama3.2:test"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


class Harness:
    """A tracker, its forest and the rows it wrote."""

    def __init__(self, tracker: Tracker, forest: TrieForest, rows: list[RequestRecord]) -> None:
        self.tracker = tracker
        self.forest = forest
        self.rows = rows

    async def request(self, prompt: str, answer: bytes, model: str = MODEL) -> None:
        """One streamed chat, from its first byte to its row."""
        ctx = RequestContext(
            request_id="kv-" + uuid.uuid4().hex[:20],
            ts_s=time.time(),
            start_s=time.perf_counter(),
            endpoint="chat",
            model=model,
            tenant=None,
            stream=True,
            upstream="default",
        )
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
        self.tracker.begin(ctx, json.dumps(body).encode(), insert=True)
        outcome = Outcome(200, None, 1.0, 2.0)
        self.tracker.complete(ctx, outcome, body=answer, content_type="text/event-stream")
        await self.tracker.drain()

    async def trie_figures(self) -> tuple[int, int]:
        """(locks held, tokens held) of the model's trie, read on the tracking thread."""
        mt = self.forest.get(MODEL)
        return await self.tracker.in_thread(lambda: (mt.trie.root.lock_ref, mt.trie.num_tokens))


@pytest.fixture
async def harness(
    tokenizer_fixtures: dict[str, TokenizerFixture], request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    data: dict[str, Any] = {
        "tokenizers": {
            "models": {"llama3.2*": str(tokenizer_fixtures["llama3"].directory)},
            "parity_check": False,
        },
        **overrides,
    }
    config = parse_config(data)
    forest = TrieForest(config.trie, config.eviction, config.upstream.cache_model)
    rows: list[RequestRecord] = []
    tracker = Tracker(
        config,
        registry=TokenizerRegistry(config.tokenizers),
        forest=forest,
        record=rows.append,
    )
    try:
        yield Harness(tracker, forest, rows)
    finally:
        await tracker.close()


def sse(*contents: str) -> bytes:
    """A streamed answer whose chunks carry ``contents`` (JSON-escaped as a backend does)."""
    head = {"id": "x", "object": "chat.completion.chunk", "model": MODEL}
    events = [
        {**head, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]}
        for c in contents
    ]
    usage = {"prompt_tokens": 10, "completion_tokens": len(contents)}
    events.append({**head, "choices": [], "usage": usage})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


# An answer the tokenizer refuses: JSON may escape a lone surrogate, which
# Python then holds in a str that no UTF-8 encoder (nor tokenizers) accepts.
LONE_SURROGATE = sse("Sure: ", "\ud800", " done")
# An answer Python's JSON parser cannot read at all (RecursionError, not ValueError).
TOO_DEEP = b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\ndata: [DONE]\n\n"


def prompt(i: int, words: int = 300) -> str:
    return f"conversation {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


@pytest.mark.parametrize("answer", [LONE_SURROGATE, TOO_DEEP], ids=["lone_surrogate", "too_deep"])
async def test_an_answer_that_cannot_be_read_still_releases_its_prompt(
    harness: Harness, answer: bytes
) -> None:
    await harness.request(prompt(0), answer)
    locks, tokens = await harness.trie_figures()
    assert tokens > 300  # the prompt went in
    assert locks == 0
    assert len(harness.rows) == 1 and harness.rows[0].prompt_tokens is not None


async def test_an_answer_with_a_lone_surrogate_is_still_added_to_the_trie(
    harness: Harness,
) -> None:
    await harness.request(prompt(0), sse("Sure: ", "done"))
    _, plain = await harness.trie_figures()
    await harness.request(prompt(1), LONE_SURROGATE)
    _, both = await harness.trie_figures()
    # The second prompt and its answer (the surrogate as U+FFFD) are held.
    assert both - plain > 300
    assert harness.tracker.stats.errors == {}


@pytest.mark.parametrize(
    "harness",
    [{"upstream": {"cache_model": {"kind": "llamacpp", "slots": 1}}}],
    indirect=True,
)
async def test_an_answer_that_cannot_be_read_frees_the_llamacpp_slot(harness: Harness) -> None:
    await harness.request(prompt(0), TOO_DEEP)
    await harness.request(prompt(1), LONE_SURROGATE)
    slots = harness.forest.get(MODEL).cache_model  # type: ignore[attr-defined]
    assert [s.busy for s in slots.slots] == [False]
    # What stays locked is what the modelled server holds: the slot's sequence
    # (prompt 1 and its answer) and the RAM prompt cache's.
    locks, _ = await harness.trie_figures()
    assert locks == 1 + len(slots.cached)


@pytest.mark.parametrize("harness", [{"trie": {"max_tokens": 2000}}], indirect=True)
async def test_answers_that_cannot_be_read_leave_the_trie_within_its_cap(
    harness: Harness,
) -> None:
    for i in range(30):  # ~9,000 prompt tokens through a 2,000-token trie
        await harness.request(prompt(i), TOO_DEEP if i % 2 else LONE_SURROGATE)
    locks, tokens = await harness.trie_figures()
    assert locks == 0
    assert tokens <= 2000
    assert len(harness.rows) == 30
    # What /trie/visualize shows of it.
    view = await harness.tracker.in_thread(describe, harness.forest.get(MODEL), None, 1, 0)
    assert view["stats"]["locks"] == 0 and view["stats"]["tokens"] == tokens


@pytest.mark.parametrize("harness", [{"tracking": {"max_models": 3}}], indirect=True)
async def test_model_names_past_max_models_pass_untracked(harness: Harness) -> None:
    # Each model name gets a trie, a cache model and a tokenizer entry of its
    # own: a client inventing a name per request grew the brain by ~14 KB a
    # request (plus its prompt, never evicted) until it was restarted.
    for i in range(20):
        await harness.request(prompt(i), sse("ok"), model=f"llama3.2:x{i % 10}")
    assert harness.forest.models() == ["llama3.2:x0", "llama3.2:x1", "llama3.2:x2"]
    assert harness.tracker.stats.skipped == {"too_many_models": 14}
    assert len(harness.rows) == 20  # every request keeps its row
    tracked = [r for r in harness.rows if r.prompt_tokens is not None]
    assert sorted({r.model for r in tracked}) == harness.forest.models()
