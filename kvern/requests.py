"""Read what a client asked for: its tenant, and the prompt its body carries.

Why: the counterpart of :mod:`kvern.usage` (what the backend answered). The
proxy forwards the body unchanged; kvern only reads it, to key the trie with
the prompt the backend will see and to group analytics by tenant. Each
endpoint states its prompt differently (chat messages, a raw completion
prompt, Ollama's ``prompt`` + ``system``), so the tokens are built the way that
endpoint's backend builds them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kvern.normalize import Normalizer
from kvern.tokenization import ModelTokenizer, PromptTokens

# Endpoints whose body carries a prompt kvern tracks.
TRACKED_ENDPOINTS = frozenset({"chat", "completions", "ollama_chat", "ollama_generate"})


def tenant_of(authorization: str | None, body: dict[str, Any] | None) -> str | None:
    """A stable, non-reversible tenant id: the ``user`` field, else the API key, hashed."""
    user = body.get("user") if isinstance(body, dict) else None
    if isinstance(user, str) and user:
        return "user:" + hashlib.sha256(user.encode()).hexdigest()[:16]
    if authorization:
        key = authorization.removeprefix("Bearer ").strip()
        if key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return None


def prompt_of(
    tok: ModelTokenizer, endpoint: str, body: dict[str, Any], norm: Normalizer
) -> PromptTokens | None:
    """Tokenize a request body the way its endpoint's backend would."""
    if endpoint in ("chat", "ollama_chat"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return tok.chat(messages, tools=tools, normalizer=norm)
    if endpoint == "ollama_generate":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        if body.get("raw") is True:
            return tok.completion(prompt, normalizer=norm)
        messages = []
        if isinstance(body.get("system"), str):
            messages.append({"role": "system", "content": body["system"]})
        messages.append({"role": "user", "content": prompt})
        return tok.chat(messages, normalizer=norm)
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tok.completion(prompt, normalizer=norm)
    return None
