"""Incremental tokenization gives exactly the whole-string ids, at the cost of the new text."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from kvern.prompt.render import prepare_messages, render_chat
from kvern.tokenize.incremental import SegmentTokenizer
from tests.conversations import growing_chat, odd_conversations


def whole_ids(hf: Any, text: str) -> list[int]:
    return list(hf.encode(text, add_special_tokens=False))


def render(hf: Any, request: dict[str, Any]) -> str:
    prepared = prepare_messages(request["messages"])
    rendered = render_chat(hf, prepared.messages, tools=request.get("tools"))
    assert rendered.used_model_template, rendered.error
    return rendered.text


def test_growing_chat_ids_equal_whole_string_ids(real_tokenizer: Any) -> None:
    seg = SegmentTokenizer(real_tokenizer.backend_tokenizer, verify_every=0)
    assert seg.enabled, seg.disabled_reason
    for messages in growing_chat(12):
        text = render(real_tokenizer, {"messages": messages})
        ids, incremental = seg.encode(text)
        assert incremental
        assert list(ids) == whole_ids(real_tokenizer, text)


def test_odd_requests_ids_equal_whole_string_ids(real_tokenizer: Any) -> None:
    seg = SegmentTokenizer(real_tokenizer.backend_tokenizer, verify_every=0)
    for request in odd_conversations():
        text = render(real_tokenizer, request)
        ids, _ = seg.encode(text)
        assert list(ids) == whole_ids(real_tokenizer, text), request


def test_ids_equal_apply_chat_template_tokenization(real_tokenizer: Any) -> None:
    seg = SegmentTokenizer(real_tokenizer.backend_tokenizer, verify_every=0)
    messages = growing_chat(3)[-1]
    expected = real_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids, _ = seg.encode(render(real_tokenizer, {"messages": messages}))
    assert list(ids) == list(expected)


def test_each_turn_tokenizes_only_its_new_text(real_tokenizer: Any) -> None:
    seg = SegmentTokenizer(real_tokenizer.backend_tokenizer, verify_every=0)
    chats = growing_chat(10)
    previous = ""
    for i, messages in enumerate(chats):
        text = render(real_tokenizer, {"messages": messages})
        before = seg.stats.num_encoded_chars
        seg.encode(text)
        encoded = seg.stats.num_encoded_chars - before
        if i >= 2:
            # Everything but the last user message and the previous reply was cached.
            new_text = len(text) - len(previous)
            assert encoded <= new_text + 200, (i, encoded, new_text)
            if i >= 6:
                assert encoded < len(text) / 3
        previous = text


def test_split_pieces_join_back_and_end_at_boundaries(real_tokenizer: Any) -> None:
    seg = SegmentTokenizer(real_tokenizer.backend_tokenizer, verify_every=0)
    text = render(real_tokenizer, {"messages": growing_chat(4)[-1]})
    pieces = seg.split(text)
    assert "".join(pieces) == text
    assert len(pieces) > 8


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.lists(
            st.sampled_from(list("ab ,.\n\t'sé日🦙0123"))
            | st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "  ", "'s", "\n\n"]),
            max_size=30,
        ).map("".join),
        min_size=1,
        max_size=6,
    )
)
def test_any_text_with_specials_tokenizes_identically(small_bpe: Any, texts: list[str]) -> None:
    seg = SegmentTokenizer(small_bpe.backend_tokenizer, verify_every=0)
    for i in range(1, len(texts) + 1):
        text = "<|im_end|>".join(texts[:i])
        ids, _ = seg.encode(text)
        assert list(ids) == whole_ids(small_bpe, text)


@pytest.fixture(scope="module")
def small_bpe(small_bpe_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_bpe_dir)


def _metaspace_first_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁b": 3, "b": 4, "<s>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    return tok


def test_tokenizer_that_cannot_be_segmented_falls_back_to_whole_strings() -> None:
    tok = _metaspace_first_tokenizer()
    seg = SegmentTokenizer(tok, verify_every=0)
    assert not seg.enabled
    assert seg.disabled_reason is not None and "probe failed" in seg.disabled_reason
    ids, incremental = seg.encode("a<s>b")
    assert not incremental
    assert list(ids) == tok.encode("a<s>b", add_special_tokens=False).ids


def test_rstrip_tokens_are_not_boundaries() -> None:
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "Ġ": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(
        [
            AddedToken("<r>", special=True, normalized=False, rstrip=True),
            AddedToken("<s>", special=True, normalized=False),
        ]
    )
    seg = SegmentTokenizer(tok, verify_every=0)
    assert seg.split("a<r> b<s> a") == ["a<r> b<s>", " a"]


def test_sampled_verification_catches_a_mismatch_and_turns_incremental_off(
    small_bpe: Any,
) -> None:
    seg = SegmentTokenizer(small_bpe.backend_tokenizer, verify_every=2)
    text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert seg.encode(text)[1]  # first prompt: verified, fine
    # Corrupt one cached segment, as a tokenizer quirk the probe missed would.
    key = next(iter(seg._cache))
    seg._cache[key] = seg._cache[key][:-1]
    ids, incremental = seg.encode(text)  # second prompt is sampled
    assert not incremental
    assert list(ids) == whole_ids(small_bpe, text)
    assert not seg.enabled and seg.stats.num_mismatches == 1


def test_cache_stays_within_its_token_budget(small_bpe: Any) -> None:
    seg = SegmentTokenizer(small_bpe.backend_tokenizer, cache_tokens=300, verify_every=0)
    for i in range(50):
        text = f"<|im_start|>user\nmessage number {i} " * 3 + "<|im_end|>"
        ids, _ = seg.encode(text)
        assert list(ids) == whole_ids(small_bpe, text)
        assert seg.cached_tokens <= 300


def test_cache_stays_within_its_byte_budget(real_tokenizer: Any) -> None:
    # Emoji make Python keep 4 bytes a character: 20 KB of segments hold only
    # a few hundred tokens, far under the token budget.
    seg = SegmentTokenizer(
        real_tokenizer.backend_tokenizer, cache_tokens=1_000_000, cache_bytes=20_000, verify_every=0
    )
    for i in range(200):
        text = f"<|im_start|>user\nmessage {i} 🦙 " + "llama " * 50 + "<|im_end|>"
        ids, incremental = seg.encode(text)
        assert incremental and list(ids) == whole_ids(real_tokenizer, text)
        assert seg.cached_bytes <= 20_000
    assert 0 < seg.cached_tokens < 5_000


@pytest.mark.parametrize(
    "words",
    [["cache", "prefix", "token"], ["cache", "🦙", "日本語"], []],
    ids=["english", "mixed_scripts", "short_segments"],
)
def test_cache_bytes_are_the_memory_the_cache_holds(real_tokenizer: Any, words: list[str]) -> None:
    seg = SegmentTokenizer(
        real_tokenizer.backend_tokenizer, cache_tokens=10**9, cache_bytes=10**12, verify_every=0
    )

    def text(i: int) -> str:  # made while traced: a request's text is the cache's to keep
        if not words:
            return f"<|im_start|>user\nq{i}<|im_end|>"
        return f"<|im_start|>user\nturn {i} " + " ".join(words[k % len(words)] for k in range(i))

    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(400):
            seg.encode(text(i))
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.85 < (after - before) / seg.cached_bytes < 1.15, (after - before, seg.cached_bytes)


def test_zero_cache_size_disables_incremental(small_bpe: Any) -> None:
    seg = SegmentTokenizer(small_bpe.backend_tokenizer, cache_tokens=0)
    assert not seg.enabled
    assert seg.encode("<|im_start|>x")[1] is False
