"""Render an OpenAI chat request into the prompt text the backend will see.

Why render at all: the backend's KV cache is keyed by the token ids of the
*rendered* prompt (chat template applied, special tokens at message
boundaries, generation prompt appended), not by the JSON messages. kvern must
produce the same string the backend produces, so it uses the model's own
template through transformers' ``apply_chat_template`` -- the same call vLLM
makes -- with ``add_generation_prompt=True``.

OpenAI requests carry things templates don't expect: ``content`` as a list of
parts, tool-call ``arguments`` as JSON *strings*, images. They are brought to
the shape HF templates expect the way vLLM does it (text parts joined with
newlines, arguments parsed into objects). Templates that raise on unusual
input (strict role alternation, say) must never stop tracking: kvern falls back
to a generic ChatML rendering and says so in the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TEXT_PART_TYPES = frozenset({"text", "input_text"})


@dataclass(slots=True)
class PreparedMessages:
    """Messages reshaped for a HF chat template."""

    messages: list[dict[str, Any]]  # the template's input
    num_ignored_parts: int  # non-text content parts (images, audio) left out


@dataclass(slots=True)
class Rendered:
    """A rendered prompt and how it was produced."""

    text: str  # the prompt text
    used_model_template: bool  # False when the generic fallback rendered it
    error: str | None  # why the model's template was not used, if it was not


def _content_text(content: Any) -> tuple[str | None, int]:
    """Return (text, ignored part count) for a message's ``content``."""
    if content is None or isinstance(content, str):
        return content, 0
    if isinstance(content, list):
        texts: list[str] = []
        ignored = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                ignored += 1
        return "\n".join(texts), ignored
    return str(content), 0


def _parse_tool_calls(tool_calls: Any) -> Any:
    """Parse JSON-string ``arguments`` into objects, as HF templates expect."""
    if not isinstance(tool_calls, list):
        return tool_calls
    out = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = function["arguments"]
            call = {**call, "function": {**function, "arguments": arguments}}
        out.append(call)
    return out


def prepare_messages(messages: Sequence[Any]) -> PreparedMessages:
    """Bring OpenAI-shaped messages into the shape chat templates read."""
    prepared: list[dict[str, Any]] = []
    ignored = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        text, num_ignored = _content_text(message.get("content"))
        ignored += num_ignored
        out = {**message, "content": text if text is not None else ""}
        if "tool_calls" in message:
            out["tool_calls"] = _parse_tool_calls(message["tool_calls"])
        prepared.append(out)
    return PreparedMessages(prepared, ignored)


def render_generic(messages: Sequence[dict[str, Any]]) -> str:
    """A ChatML rendering, used when the model's template is missing or raised."""
    parts = [
        f"<|im_start|>{m.get('role', 'user')}\n{m.get('content') or ''}<|im_end|>\n"
        for m in messages
    ]
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Rendered:
    """Render prepared ``messages`` with the tokenizer's chat template.

    Falls back to :func:`render_generic` (and reports why) when the tokenizer
    has no template or the template raises.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return Rendered(render_generic(messages), False, "no chat template")
    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tools=tools or None,
            add_generation_prompt=True,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # noqa: BLE001 - any template error must fall back
        return Rendered(render_generic(messages), False, f"{type(exc).__name__}: {exc}"[:300])
    if not isinstance(text, str):
        return Rendered(render_generic(messages), False, "template did not return text")
    return Rendered(text, True, None)
