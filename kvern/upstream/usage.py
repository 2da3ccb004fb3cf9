"""Read what the backend said about a request: usage, finish reason, its own cache figure.

Why: kvern predicts how many prompt tokens the backend could serve from its KV
cache; the backend often reports what it really reused. Reading that figure
lets every prediction be checked. The sources differ by backend:

- ``usage.prompt_tokens_details.cached_tokens`` (vLLM, SGLang, llama.cpp, OpenAI)
- ``timings.cache_n`` (llama.cpp's server, in each final chunk / body)
- ``prompt_eval_count`` (Ollama's native API: tokens it *evaluated*, so the
  cached figure is prompt tokens minus it)

This runs after the response was relayed, off the request path, on the bytes
the relay kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ResponseFacts:
    """What a response said about itself."""

    completion_tokens: int | None = None  # usage.completion_tokens, else counted chunks
    upstream_prompt_tokens: int | None = None  # usage.prompt_tokens
    reported_cached_tokens: int | None = None  # the backend's cache figure
    reported_cached_source: str | None = None  # which field it came from
    prompt_eval_count: int | None = None  # Ollama: prompt tokens evaluated (not cached)
    finish_reason: str | None = None  # last finish reason seen
    completion_text: str = ""  # the generated text of the first choice (content only)


def _int(value: Any) -> int | None:
    """A token count as the backend reported it; None for anything that is not one.

    Not negative, and within SQLite's 64-bit integers: a count beyond either
    is a broken report, not a figure to keep.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


def _absorb(facts: ResponseFacts, obj: Any, counted: list[int], parts: list[str]) -> None:
    if not isinstance(obj, dict):
        return
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        first = choice.get("index", 0) == 0
        if choice.get("finish_reason"):
            facts.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta")
        message = choice.get("message")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            counted[0] += 1
            if first and isinstance(delta.get("content"), str):
                parts.append(delta["content"])
        elif isinstance(choice.get("text"), str) and choice["text"]:
            counted[0] += 1
            if first:
                parts.append(choice["text"])
        elif isinstance(message, dict) and first and isinstance(message.get("content"), str):
            parts.append(message["content"])
    # Ollama's native API: {"message": {"content": ...}} per line, or "response".
    message = obj.get("message")
    if "choices" not in obj and isinstance(message, dict):
        if isinstance(message.get("content"), str):
            parts.append(message["content"])
    elif "choices" not in obj and isinstance(obj.get("response"), str):
        parts.append(obj["response"])
    usage = obj.get("usage")
    if isinstance(usage, dict):
        facts.completion_tokens = _int(usage.get("completion_tokens"))
        facts.upstream_prompt_tokens = _int(usage.get("prompt_tokens"))
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and _int(details.get("cached_tokens")) is not None:
            facts.reported_cached_tokens = details["cached_tokens"]
            facts.reported_cached_source = "usage.prompt_tokens_details.cached_tokens"
    timings = obj.get("timings")
    if isinstance(timings, dict) and _int(timings.get("cache_n")) is not None:
        if facts.reported_cached_source is None or facts.reported_cached_source.startswith(
            "timings"
        ):
            facts.reported_cached_tokens = timings["cache_n"]
            facts.reported_cached_source = "timings.cache_n"
    # Ollama's native /api/chat and /api/generate final object.
    if obj.get("done") is True:
        if _int(obj.get("prompt_eval_count")) is not None:
            facts.prompt_eval_count = obj["prompt_eval_count"]
        if _int(obj.get("eval_count")) is not None:
            facts.completion_tokens = obj["eval_count"]
        if isinstance(obj.get("done_reason"), str):
            facts.finish_reason = obj["done_reason"]


def parse_response(body: bytes, content_type: str) -> ResponseFacts:
    """Parse a whole response: SSE (``text/event-stream``), NDJSON (Ollama) or JSON."""
    facts = ResponseFacts()
    counted = [0]
    parts: list[str] = []
    text = body.decode("utf-8", errors="replace")
    if "event-stream" in content_type:
        for line in text.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == "[DONE]":
                continue
            try:
                _absorb(facts, json.loads(payload), counted, parts)
            except (ValueError, RecursionError):  # one bad event loses only itself
                continue
    elif "ndjson" in content_type or ("\n{" in text and not text.lstrip().startswith("[")):
        for line in text.splitlines():
            if line.strip():
                try:
                    _absorb(facts, json.loads(line), counted, parts)
                except (ValueError, RecursionError):
                    continue
    else:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            return facts
        _absorb(facts, obj, counted, parts)
    facts.completion_text = "".join(parts)
    if facts.completion_tokens is None and counted[0]:
        facts.completion_tokens = counted[0]
    return facts
