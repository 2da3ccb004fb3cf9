"""Rendering OpenAI requests through real chat templates, as a backend does."""

from __future__ import annotations

from typing import Any

from kvern.prompt.render import prepare_messages, render_chat, render_generic
from tests import assets
from tests.conversations import WEATHER_TOOL, odd_conversations


def test_generation_prompt_is_appended(real_tokenizer: Any, real_tokenizer_name: str) -> None:
    rendered = render_chat(real_tokenizer, [{"role": "user", "content": "Hi"}])
    assert rendered.used_model_template and rendered.error is None
    tail = (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if real_tokenizer_name == "llama3"
        else "<|im_start|>assistant\n"
    )
    assert rendered.text.endswith(tail)


def test_rendering_matches_the_templates_own_apply(real_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = real_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert render_chat(real_tokenizer, messages).text == expected


def test_llama_template_injects_today_date(hf_tokenizers: dict[str, Any]) -> None:
    text = render_chat(hf_tokenizers["llama3"], [{"role": "user", "content": "Hi"}]).text
    assert "Today Date: " in text
    other_day = render_chat(
        hf_tokenizers["llama3"],
        [{"role": "user", "content": "Hi"}],
        template_kwargs={"date_string": "26 Jul 2024"},
    ).text
    assert "Today Date: 26 Jul 2024" in other_day


def test_text_parts_are_kept_and_other_parts_counted(real_tokenizer: Any) -> None:
    parts = [
        {"type": "text", "text": "Describe this."},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "Briefly."},
    ]
    prepared = prepare_messages([{"role": "user", "content": parts}])
    assert prepared.num_ignored_parts == 1
    assert prepared.messages[0]["content"] == "Describe this.\nBriefly."
    as_parts = render_chat(real_tokenizer, prepared.messages).text
    as_string = render_chat(
        real_tokenizer, [{"role": "user", "content": "Describe this.\nBriefly."}]
    ).text
    assert as_parts == as_string


def test_tools_are_rendered(real_tokenizer: Any) -> None:
    rendered = render_chat(
        real_tokenizer, [{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    )
    assert rendered.used_model_template, rendered.error
    assert "get_weather" in rendered.text and "City name" in rendered.text


def test_tool_call_arguments_strings_are_parsed_for_the_template(real_tokenizer: Any) -> None:
    request = odd_conversations()[5]
    prepared = prepare_messages(request["messages"])
    call = prepared.messages[1]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Paris"}
    assert request["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    rendered = render_chat(real_tokenizer, prepared.messages, tools=request["tools"])
    assert rendered.used_model_template, rendered.error
    assert '"city": "Paris"' in rendered.text
    assert "temp_c" in rendered.text


def test_every_odd_request_renders_with_the_model_template(real_tokenizer: Any) -> None:
    for request in odd_conversations():
        prepared = prepare_messages(request["messages"])
        rendered = render_chat(real_tokenizer, prepared.messages, tools=request.get("tools"))
        assert rendered.used_model_template, (request, rendered.error)


def test_template_that_raises_falls_back_to_generic_rendering(real_tokenizer: Any) -> None:
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(str(real_tokenizer.name_or_path))
    strict.chat_template = (
        assets.models_dir() / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja"
    ).read_text(encoding="utf-8")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    rendered = render_chat(strict, messages)
    assert not rendered.used_model_template
    assert rendered.error is not None and "alternate" in rendered.error
    assert rendered.text == render_generic(messages)


def test_missing_template_falls_back_to_generic_rendering() -> None:
    rendered = render_chat(None, [{"role": "user", "content": "x"}])
    assert not rendered.used_model_template
    assert rendered.text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_non_dict_messages_are_skipped_not_fatal() -> None:
    prepared = prepare_messages(["oops", {"role": "user", "content": None}])  # type: ignore[list-item]
    assert prepared.messages == [{"role": "user", "content": ""}]
