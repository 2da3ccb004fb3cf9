"""Read what a client asked for: the prompt its body carries.

Why: the counterpart of :mod:`kvern.upstream.usage` (what the backend
answered). The proxy forwards the body unchanged; kvern only reads it, to key
the trie with the prompt the backend will see (tenants are read by
:mod:`kvern.prompt.tenants`). Each endpoint states its prompt differently
(chat messages, a raw completion prompt, Ollama's ``prompt`` + ``system``); :func:`read_prompt` says
which form the backend builds its tokens from, and
:meth:`kvern.tokenize.model_tokenizer.ModelTokenizer.request` tokenizes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Endpoints whose body carries a prompt kvern tracks.
TRACKED_ENDPOINTS = frozenset({"chat", "completions", "ollama_chat", "ollama_generate"})


def plain_text(value: str) -> str:
    """``value`` as valid Unicode: lone surrogates become U+FFFD.

    Why: JSON may escape a lone surrogate (``"m\\ud800"``); Python then holds
    a string no UTF-8 encoder accepts. Forwarded, the body stays as the client
    sent it; but a name kvern keeps (a model in its tries, /health and rows)
    must encode, or one request breaks every later answer that shows it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


@dataclass(slots=True, frozen=True)
class RequestPrompt:
    """The prompt one body carries, in the form its endpoint's backend builds tokens from."""

    messages: list[Any] | None = None  # a chat, rendered with the model's template
    tools: list[dict[str, Any]] | None = None  # tool definitions the template renders
    text: str | None = None  # a raw prompt, tokenized as it is (BOS added)


def read_prompt(endpoint: str, body: dict[str, Any]) -> RequestPrompt | None:
    """The prompt of a request body, read the way its endpoint's backend reads it.

    None when the body carries no prompt kvern can track (a malformed body is
    still forwarded; the backend answers it, kvern only skips it).
    """
    if endpoint in ("chat", "ollama_chat"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return RequestPrompt(messages=messages, tools=tools)
    if endpoint == "ollama_generate":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        if body.get("raw") is True:
            return RequestPrompt(text=prompt)
        chat: list[Any] = []
        if isinstance(body.get("system"), str):
            chat.append({"role": "system", "content": body["system"]})
        chat.append({"role": "user", "content": prompt})
        return RequestPrompt(messages=chat)
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return RequestPrompt(text=prompt)
    return None
