"""Why it missed: reasons that add up, where a divergence falls, rules generalised and measured."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kvern.diagnosis.advice import advise, scope_for
from kvern.diagnosis.layout import message_spans, place_of, tools_spans
from kvern.diagnosis.reasons import assign
from kvern.diagnosis.replay import Sample, replay
from kvern.diagnosis.rules import Example, suggest, varying_spans
from kvern.tokenize.model_tokenizer import ModelTokenizer


@given(
    total=st.integers(0, 5000),
    matched=st.integers(0, 5000),
    block=st.integers(1, 64),
    continued=st.booleans(),
    reach=st.integers(0, 6000),
    predicted=st.one_of(st.none(), st.integers(-10, 6000)),
    reported=st.one_of(st.none(), st.integers(-10, 6000)),
    elsewhere=st.integers(0, 6000),
)
def test_every_prompt_token_is_reused_or_given_a_reason(
    total: int,
    matched: int,
    block: int,
    continued: bool,
    reach: int,
    predicted: int | None,
    reported: int | None,
    elsewhere: int,
) -> None:
    b = assign(
        prompt_tokens=total,
        matched=matched,
        block_size=block,
        continued=continued,
        reach=reach,
        predicted=predicted,
        reported=reported,
        best_elsewhere=elsewhere,
    )
    assert b.reused + b.lost_tokens + b.miss_tokens + b.novel_tokens == total
    assert min(b.reused, b.lost_tokens, b.miss_tokens, b.novel_tokens) >= 0
    assert (b.miss_reason is None) == (b.miss_tokens == 0)
    assert (b.lost_reason is None) == (b.lost_tokens == 0)


def test_reasons_name_what_happened() -> None:
    first = assign(
        prompt_tokens=100, matched=0, block_size=16, continued=False, predicted=0, reported=0
    )
    assert (first.miss_reason, first.miss_tokens) == ("cold", 100)
    short = assign(
        prompt_tokens=100, matched=9, block_size=16, continued=True, predicted=0, reported=0
    )
    assert short.miss_reason == "below_block"
    # Shared 40, an earlier prompt went on to 90: 90 - 32 diverged, the rest novel.
    split = assign(
        prompt_tokens=100,
        matched=40,
        block_size=16,
        continued=True,
        reach=90,
        predicted=32,
        reported=32,
    )
    assert (split.miss_reason, split.miss_tokens, split.novel_tokens) == ("diverged", 58, 10)
    turn = assign(
        prompt_tokens=100, matched=80, block_size=16, continued=False, predicted=80, reported=80
    )
    assert (turn.miss_reason, turn.novel_tokens) == (None, 20)
    gone = assign(
        prompt_tokens=100, matched=80, block_size=16, continued=False, predicted=80, reported=16
    )
    assert (gone.lost_reason, gone.lost_tokens) == ("evicted", 64)
    away = assign(
        prompt_tokens=100,
        matched=80,
        block_size=16,
        continued=False,
        predicted=0,
        reported=0,
        best_elsewhere=80,
    )
    assert away.lost_reason == "routed_away"
    unchecked = assign(
        prompt_tokens=100, matched=80, block_size=16, continued=False, predicted=48, reported=None
    )
    assert (unchecked.lost_reason, unchecked.lost_tokens) == ("unreported", 32)


def _rewrite(s: Any, text: str) -> str:
    return re.sub(s.pattern, s.replacement, text)


def test_a_uuid_a_date_a_time_and_an_id_are_generalised_and_anchored() -> None:
    uuid = suggest(
        [
            Example(
                "Session id: ",
                "3f2a1b4c-1111-2222-3333-444455556666. Be kind.",
                "9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff. Be kind.",
            ),
            Example(
                "Session id: ",
                "0a1b2c3d-4e5f-6789-abcd-ef0123456789. Be kind.",
                "9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff. Be kind.",
            ),
        ],
        scope="messages",
    )
    assert uuid is not None and uuid.kind == "uuid" and uuid.replacement == "<uuid>"
    assert (
        _rewrite(uuid, "Session id: 0a1b2c3d-4e5f-6789-abcd-ef0123456789. Be kind.")
        == "Session id: <uuid>. Be kind."
    )
    # Another UUID elsewhere is left alone: the rule is anchored on its context.
    assert "12345678" in _rewrite(uuid, "User 12345678-1234-1234-1234-123456789012")
    date = suggest(
        [Example("Today Date: 2", "6 Jul 2024\n\nYou", "7 Jul 2024\n\nYou")], scope="prompt"
    )
    assert date is not None and date.kind == "date"
    assert _rewrite(date, "Today Date: 26 Jul 2024\n") == "Today Date: <date>\n"
    time = suggest([Example("It is now 1", "4:05 UTC.", "5:30 UTC.")], scope="messages")
    assert time is not None and time.kind == "time"
    rid = suggest([Example("ticket req_", "8f3k2a, thanks", "91xz0b, thanks")], scope="messages")
    assert rid is not None and rid.kind == "id"
    assert _rewrite(rid, "ticket req_8f3k2a, thanks") == "ticket <id>, thanks"


def test_sides_that_never_meet_again_give_no_common_span() -> None:
    found = varying_spans(Example("Answer: ", "yes, because of the weather", "no, I cannot say"))
    assert found is not None
    assert suggest([Example("Answer: ", "yes, because", "no, I cannot")], scope="messages") is None


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_replay_measures_the_saving_and_refuses_a_rule_that_merges_other_text() -> None:
    base = "System. Session id: {sid}. You help with billing questions in detail. User {uid} asks."
    texts = [base.format(sid=f"{i:04d}ab", uid="u1") for i in range(6)]
    samples = [Sample(t, t.index("Session id: ") + 12) for t in texts]
    good = replay(samples, r"(?<=Session id: )\w+", "<id>", _chars, block_size=4)
    assert good.saved_tokens > 0 and not good.merges_beyond_span
    assert good.reused_after > good.reused_before
    # A bare pattern also rewrites the user id, which differs between these prompts.
    mixed = [base.format(sid=f"{i:04d}ab", uid=f"u{i}") for i in range(6)]
    mixed_samples = [Sample(t, t.index("Session id: ") + 12) for t in mixed]
    bad = replay(mixed_samples, r"\b\w*\d\w*\b", "<id>", _chars, block_size=4)
    assert bad.merges_beyond_span and bad.other_rewrites > 0
    advice = advise(
        [
            Example(t[: s.diverge_char], t[s.diverge_char :], mixed[0][s.diverge_char :])
            for t, s in zip(mixed[1:], mixed_samples[1:], strict=True)
        ],
        mixed_samples,
        place_kind="system",
        tokenize=_chars,
        block_size=4,
    )
    assert advice.rule is not None and not advice.measured.merges_beyond_span  # type: ignore[union-attr]
    assert advice.rule.as_config()["scope"] == scope_for("system") == "messages"


def test_places_in_a_real_llama3_rendering(tokenizer_fixtures: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_fixtures["llama3"].directory))
    tok = ModelTokenizer(hf, source="llama3")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Find an order",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "You are the billing assistant."},
        {"role": "user", "content": "Where is order 12?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "user", "content": "Thanks."},
    ]
    prompt = tok.chat(messages, tools=tools)
    assert prompt.messages is not None
    text = prompt.text
    spans = message_spans(text, prompt.messages)
    tool_parts = tools_spans(text, tok.render_without_tools(prompt.messages))
    assert any("lookup_order" in text[p.start : p.end] for p in tool_parts)
    spans.extend(tool_parts)
    assert place_of(text.index("billing assistant"), spans).describe() == "system prompt"
    assert place_of(text.index("Let me look"), spans).describe() == "message 2 (assistant)"
    assert place_of(text.index("lookup_order"), spans).describe() == "tool definitions"
    assert place_of(text.index("Today Date"), spans).describe() == "template text"


def test_the_character_of_a_token_is_found_from_the_segment_that_holds_it(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_fixtures["qwen2"].directory))
    tok = ModelTokenizer(hf, source="qwen2")
    messages = [
        {"role": "system", "content": "You help. Ünïcödé 🦙 and 12345."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "Second one, with more words in it."},
    ]
    prompt = tok.chat(messages)
    prompt = tok.chat(messages)  # the segments are cached now
    assert prompt.incremental
    ids, text = prompt.ids, prompt.text
    for k in range(len(ids) + 1):
        assert tok.char_of_token(text, ids, k) == len(tok.decode(ids[:k])), k


def test_the_text_before_a_divergence_in_a_message_stays_inside_that_message(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    """A rule for message text is applied to the message alone: no template text in its anchor."""
    from transformers import AutoTokenizer

    from kvern.config import DiagnosisConfig
    from kvern.tracking.divergence import DivergenceFinder
    from kvern.trie import RadixTrie

    hf = AutoTokenizer.from_pretrained(str(tokenizer_fixtures["qwen2"].directory))
    tok = ModelTokenizer(hf, source="qwen2")
    finder = DivergenceFinder(DiagnosisConfig())
    trie = RadixTrie()
    found = []
    for sid in ("3f2a1b4c-1111-2222-3333-444455556666", "9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff"):
        messages = [
            {"role": "system", "content": f"{sid} You are helpful."},
            {"role": "user", "content": "Hi"},
        ]
        prompt = tok.chat(messages)
        found.append(finder.find(tok, prompt, trie.insert(prompt.ids, 0.0)))
    divergence = found[1].divergence
    assert divergence is not None and divergence.place == "system prompt"
    assert (
        divergence.before == ""
    )  # the message starts there: "<|im_start|>system\n" is the template's
    assert divergence.ours.startswith("9e8d7c6b") and divergence.theirs.startswith("3f2a1b4c")


def test_a_message_the_template_trims_is_still_found() -> None:
    text = "<|header|>system\n\nYou help.<|eot|><|header|>user\n\nHi<|eot|>"
    spans = message_spans(
        text, [{"role": "system", "content": "You help.  "}, {"role": "user", "content": " Hi"}]
    )
    assert [(s.kind, text[s.start : s.end]) for s in spans] == [
        ("system", "You help."),
        ("message", "Hi"),
    ]


def test_a_divergence_in_the_last_message_is_marked_and_its_site_ranks_last() -> None:
    from kvern.diagnosis.layout import Place, actionable

    last = Place("message", 5, "user", last=True).describe()
    assert last == "message 5 (user), the last" and not actionable(last)
    assert actionable(Place("message", 3, "user").describe())
    assert actionable("system prompt") and actionable("template text")


async def test_sites_in_a_last_message_come_after_the_others_in_analytics(tmp_path: Any) -> None:
    from kvern.analytics.misses import sites
    from kvern.analytics.store import AnalyticsStore
    from tests.test_analytics_store import make_record

    store = AnalyticsStore(str(tmp_path / "kvern.db"), flush_interval_ms=10)
    await store.start()
    try:
        for i, (place, lost) in enumerate(
            [("message 5 (user), the last", 900), ("system prompt", 100)]
        ):
            store.record(
                make_record(
                    i,
                    ts_s=1000.0 + i,
                    miss_reason="diverged",
                    miss_tokens=lost,
                    diverge_prefix=f"p{i}",
                    diverge_place=place,
                    diverge_at=10,
                )
            )
        await store.flush()
        found = await sites(store, window="all", model=None, now_s=2000.0, top=5)
    finally:
        await store.close()
    assert [s["place"] for s in found] == ["system prompt", "message 5 (user), the last"]


def test_a_sites_advice_is_replayed_once_until_the_site_gets_a_new_prompt(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    """The dashboard asks every few seconds: a replay each time would load the tracking thread."""
    from transformers import AutoTokenizer

    from kvern.config import DiagnosisConfig, parse_config
    from kvern.tracking.divergence import DivergenceFinder
    from kvern.tracking.forest import TrieForest
    from kvern.tracking.site_advice import SiteAdvisor

    hf = AutoTokenizer.from_pretrained(str(tokenizer_fixtures["qwen2"].directory))
    tok = ModelTokenizer(hf, source="qwen2")
    config = parse_config({})
    forest = TrieForest(config.trie, config.eviction)
    finder = DivergenceFinder(DiagnosisConfig())
    advisor = SiteAdvisor(finder.samples, forest, 8)
    mt = forest.get("m")

    def send(sid: str) -> Any:
        messages = [{"role": "system", "content": f"You help. Session id: {sid}. Be brief."}]
        prompt = tok.chat(messages)
        return finder.find(tok, prompt, mt.trie.insert(prompt.ids, 0.0)).divergence

    for sid in ("0a1b2c3d-4e5f-6789-abcd-ef0123456789", "1f2e3d4c-5b6a-7988-aabb-ccddeeff0011"):
        divergence = send(sid)
    assert divergence is not None
    asked = [
        (
            "m",
            divergence.site,
            divergence.place,
            [(divergence.before, divergence.ours, divergence.theirs)],
        )
    ]
    first = advisor.advise(asked, {"m": tok})
    assert advisor.advise(asked, {"m": tok}) == first and advisor.num_replays == 1
    send("2a3b4c5d-6e7f-8091-a2b3-c4d5e6f70819")
    advisor.advise(asked, {"m": tok})
    assert advisor.num_replays == 2
