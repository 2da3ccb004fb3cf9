"""The tokenizer registry: resolution, lazy single loads, fallbacks that never stop tracking."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from kvern.config import TokenizerEntry, TokenizersConfig
from kvern.tokenize.model_tokenizer import ModelTokenizer
from kvern.tokenize.registry import TokenizerRegistry, load_hf_tokenizer
from tests import assets
from tests.conversations import growing_chat


def config_for(models: dict[str, Any], **kw: Any) -> TokenizersConfig:
    return TokenizersConfig.model_validate({"models": models, **kw})


def test_glob_resolves_ollama_tags_to_one_shared_load(tokenizer_fixtures: dict[str, Any]) -> None:
    calls: list[str] = []

    def loader(entry: TokenizerEntry) -> Any:
        calls.append(entry.source)
        return load_hf_tokenizer(entry)

    registry = TokenizerRegistry(
        config_for({"qwen2.5:*": str(tokenizer_fixtures["qwen2"].directory)}), loader=loader
    )
    a = registry.get_sync("qwen2.5:7b")
    b = registry.get_sync("qwen2.5:0.5b")
    assert a is b and a.kind == "exact"
    assert len(calls) == 1
    assert [s.model for s in registry.states()] == ["qwen2.5:0.5b", "qwen2.5:7b"]


async def test_concurrent_first_requests_share_one_load_off_the_event_loop(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    threads: list[int] = []

    def loader(entry: TokenizerEntry) -> Any:
        threads.append(threading.get_ident())
        return load_hf_tokenizer(entry)

    registry = TokenizerRegistry(
        config_for({"m": str(tokenizer_fixtures["llama3"].directory)}), loader=loader
    )
    results = await asyncio.gather(*(registry.get("m") for _ in range(5)))
    assert len({id(r) for r in results}) == 1
    assert threads and threads[0] != threading.get_ident()
    assert len(threads) == 1


async def test_every_load_is_followed_once_by_after_load_on_the_loop_with_the_tokenizer_in_place(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    # The brain freezes what a load built in after_load; the start-up parity
    # check, not a request, loads first, and the freeze once hung on the
    # request path only: it never ran, and each full collection under load
    # scanned transformers' modules (130 ms; five routing decisions timed out).
    registry = TokenizerRegistry(config_for({"m": str(tokenizer_fixtures["qwen2"].directory)}))
    seen: list[tuple[bool, bool]] = []
    loop_thread = threading.get_ident()
    registry.after_load = lambda: seen.append(
        (threading.get_ident() == loop_thread, registry.loaded("m") is not None)
    )
    await asyncio.gather(registry.get("m"), registry.get("m"))
    await registry.get("m")
    assert seen == [(True, True)]


async def test_a_cancelled_caller_does_not_cancel_the_load_others_wait_for(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    # A parity check cancelled at shutdown was the first caller; tracking
    # waited on the same load and, cancelled with it, never released its jobs.
    started = threading.Event()
    release = threading.Event()

    def loader(entry: TokenizerEntry) -> Any:
        started.set()
        release.wait(10)
        return load_hf_tokenizer(entry)

    registry = TokenizerRegistry(
        config_for({"m": str(tokenizer_fixtures["qwen2"].directory)}), loader=loader
    )
    first = asyncio.ensure_future(registry.get("m"))
    second = asyncio.ensure_future(registry.get("m"))
    await asyncio.to_thread(started.wait, 10)
    first.cancel()
    release.set()
    tok = await second
    assert first.cancelled()
    assert tok.kind == "exact"
    assert registry.loaded("m") is tok


async def test_failed_load_falls_back_and_says_why() -> None:
    def loader(entry: TokenizerEntry) -> Any:
        raise OSError("gated repo: 401")

    registry = TokenizerRegistry(config_for({"m": "org/gated"}), loader=loader)
    tok = await registry.get("m")
    assert tok.kind == "fallback"
    prompt = tok.chat([{"role": "user", "content": "hello there"}])
    assert prompt.kind == "fallback" and len(prompt.ids) > 0
    state = registry.states()[0]
    assert state.kind == "fallback" and state.error is not None and "gated repo" in state.error


def test_unmapped_model_uses_the_labelled_fallback() -> None:
    registry = TokenizerRegistry(config_for({}))
    tok = registry.get_sync("mystery-model")
    assert tok.kind == "fallback"
    assert registry.states()[0].error == "no tokenizer configured for model 'mystery-model'"


def test_fallback_keeps_prefix_structure_and_decodes() -> None:
    tok = ModelTokenizer(None, source=None)
    chats = growing_chat(3)
    first = tok.chat(chats[0]).ids
    second = tok.chat(chats[1]).ids
    assert list(second[: len(first) - 4]) == list(first[: len(first) - 4])
    assert "Question 0" in tok.decode(first)


def test_gguf_source_with_template_override_is_exact(tokenizer_fixtures: dict[str, Any]) -> None:
    fx = tokenizer_fixtures["qwen2"]
    registry = TokenizerRegistry(
        config_for({"q": {"source": str(fx.gguf), "chat_template": str(fx.template)}})
    )
    tok = registry.get_sync("q")
    assert tok.kind == "exact" and tok.incremental
    prompt = tok.chat(growing_chat(2)[-1])
    assert prompt.used_model_template
    assert list(prompt.ids) == tok.hf.encode(prompt.text, add_special_tokens=False)


def test_inline_template_override(tokenizer_fixtures: dict[str, Any]) -> None:
    registry = TokenizerRegistry(
        config_for(
            {
                "q": {
                    "source": str(tokenizer_fixtures["qwen2"].directory),
                    "chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}",
                }
            }
        )
    )
    assert registry.get_sync("q").chat([{"role": "user", "content": "x"}]).text == "[x]"


def test_chat_reports_ignored_parts_and_template_state(real_tokenizer: Any) -> None:
    tok = ModelTokenizer(real_tokenizer, source="t")
    prompt = tok.chat(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]
    )
    assert prompt.num_ignored_parts == 1
    assert prompt.kind == "exact" and prompt.used_model_template and prompt.incremental


def test_completion_prompt_gets_bos_like_the_backend(hf_tokenizers: dict[str, Any]) -> None:
    tok = ModelTokenizer(hf_tokenizers["llama3"], source="llama3")
    ids = tok.completion("Once upon a time").ids
    assert ids[0] == hf_tokenizers["llama3"].convert_tokens_to_ids("<|begin_of_text|>")


def test_decode_shows_special_tokens(real_tokenizer: Any) -> None:
    tok = ModelTokenizer(real_tokenizer, source="t")
    prompt = tok.chat([{"role": "user", "content": "Hi"}])
    assert tok.decode(prompt.ids) == prompt.text


@pytest.mark.parametrize("name", list(assets.FIXTURES))
def test_verification_sampling_rate_maps_to_every_nth(name: str) -> None:
    registry = TokenizerRegistry(config_for({}, verify_sample_rate=0.25))
    assert registry._verify_every == 4


def test_the_segment_cache_is_held_to_the_configured_bytes(
    tokenizer_fixtures: dict[str, Any],
) -> None:
    registry = TokenizerRegistry(
        config_for(
            {"m": str(tokenizer_fixtures["llama3"].directory)}, incremental_cache_bytes=50_000
        )
    )
    tok = registry.get_sync("m")
    assert tok.segments is not None
    for messages in growing_chat(40):
        tok.chat(messages)
        assert tok.segments.cached_bytes <= 50_000
    assert tok.segments.cached_bytes > 25_000 and tok.incremental
