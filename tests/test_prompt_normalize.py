"""Normalization rules: ordered, scoped, never touching the client's request."""

from __future__ import annotations

from typing import Any

from kvern.config import NormalizationRule
from kvern.prompt.normalize import Normalizer
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.trie import RadixTrie


def rule(pattern: str, replacement: str, **kw: Any) -> NormalizationRule:
    return NormalizationRule(pattern=pattern, replacement=replacement, **kw)


def test_rules_apply_in_order() -> None:
    norm = Normalizer.from_rules([rule(r"\d+", "<N>"), rule(r"<N>-<N>", "<RANGE>")])
    assert norm.text("pages 10-20 and 7") == "pages <RANGE> and <N>"


def test_message_rules_reach_string_content_and_text_parts_without_mutation() -> None:
    norm = Normalizer.from_rules([rule(r"id=\w+", "id=<ID>")])
    messages = [
        {"role": "user", "content": "id=abc"},
        {"role": "user", "content": [{"type": "text", "text": "x id=zz"}, {"type": "image_url"}]},
    ]
    out = norm.messages(messages)
    assert out[0]["content"] == "id=<ID>"
    assert out[1]["content"][0]["text"] == "x id=<ID>"
    assert out[1]["content"][1] == {"type": "image_url"}
    assert messages[0]["content"] == "id=abc"


def test_prompt_rules_apply_only_to_the_rendered_prompt() -> None:
    norm = Normalizer.from_rules([rule("X", "Y", scope="prompt")])
    assert norm.text("X") == "X"
    assert norm.prompt("X") == "Y"


def test_flags_are_honoured() -> None:
    norm = Normalizer.from_rules([rule("^today.*$", "<T>", flags=["IGNORECASE", "MULTILINE"])])
    assert norm.text("a\nTODAY is\nb") == "a\n<T>\nb"


def test_injected_date_rule_makes_two_days_share_their_prefix(
    hf_tokenizers: dict[str, Any],
) -> None:
    tok = ModelTokenizer(hf_tokenizers["llama3"], source="llama3", verify_every=1)
    messages = [
        {"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "What changed?"},
    ]
    date_rule = Normalizer.from_rules(
        [rule(r"Today Date: \d{1,2} \w{3} \d{4}", "Today Date: <DATE>", scope="prompt")]
    )
    for normalizer, expect_shared in ((None, False), (date_rule, True)):
        trie = RadixTrie()
        day1 = tok.chat(
            messages, normalizer=normalizer, template_kwargs={"date_string": "1 Jan 2026"}
        )
        day2 = tok.chat(
            messages, normalizer=normalizer, template_kwargs={"date_string": "2 Jan 2026"}
        )
        trie.insert(day1.ids, now_s=0.0)
        matched = trie.insert(day2.ids, now_s=1.0).matched_tokens
        if expect_shared:
            assert matched == len(day2.ids)
        else:
            # Only the header before the date is shared: the date breaks the prefix early.
            assert 0 < matched < 30
