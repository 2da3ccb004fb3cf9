"""What the truth tests share: kvern's rows, waiting for them, chats through the openai client.

Why a module: every truth test (llama-server, vLLM) does the same three things
-- drive kvern with the official client, wait until kvern's rows have landed,
read predicted beside reported from the analytics db -- and only the backend
and its cache rules differ.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai


def rows(db: Path) -> list[dict[str, Any]]:
    """Every request row kvern wrote, in arrival order."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    out = [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY rowid")]
    con.close()
    return out


def flush(url: str) -> None:
    """Wait until kvern at ``url`` has written the rows of every answered request."""
    params = {"window": "all", "wait_s": 60}
    assert httpx.get(url + "/analytics", params=params, timeout=90).status_code == 200


def client_for(kvern: str) -> openai.OpenAI:
    """The official client, pointed at kvern, without retries (each request counts once)."""
    return openai.OpenAI(base_url=kvern + "/v1", api_key="x", max_retries=0)


def chat(
    client: openai.OpenAI,
    model: str,
    messages: list[dict[str, str]],
    *,
    user: str | None = None,
    max_tokens: int = 8,
    **sampling: Any,
) -> str:
    """One chat turn (greedy unless ``sampling`` says otherwise); returns the answer's text."""
    reply = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        **({"temperature": 0} | sampling),
        **({"user": user} if user else {}),
    )
    return reply.choices[0].message.content or ""


def stream_chat(
    client: openai.OpenAI, model: str, messages: list[dict[str, str]], **sampling: Any
) -> str:
    """One streamed chat turn with usage in its last chunk; returns the answer's text."""
    parts: list[str] = []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **({"max_tokens": 8, "temperature": 0} | sampling),
    )
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
    return "".join(parts)
