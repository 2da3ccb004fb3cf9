"""Reading a log of requests: one JSON object a line, streamed, bad lines counted, never fatal.

Three shapes are read, each line on its own (a log may mix them):

- an OpenAI Batch API input line ``{"custom_id", "method", "url", "body"}``:
  the endpoint comes from the URL (``/v1/chat/completions`` is a chat,
  ``/v1/completions`` a raw prompt; Ollama's ``/api/chat`` and
  ``/api/generate`` too);
- kvern's own capture (:mod:`kvern.analytics.capture`): a Batch line with a
  ``kvern`` object carrying ``ts_s``, the keyed ``tenant`` and the
  ``endpoint``;
- a bare body: one with ``messages`` is a chat, one with ``prompt`` a
  completion.

Why stream: a capture of a busy day is gigabytes; the reader holds one line
at a time, and says how far into the file it is (for the progress bar).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

from kvern.prompt.requests import RequestPrompt, read_prompt

# URL path endings -> kvern's endpoint names (the inverse of the capture's URLS).
_ENDPOINTS: Final[tuple[tuple[str, str], ...]] = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/api/chat", "ollama_chat"),
    ("/api/generate", "ollama_generate"),
)
# Bad lines listed by number (all are counted).
MAX_LISTED: Final[int] = 50
# The tenant of a line that names none.
NO_TENANT: Final[str] = "-"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One request of the log, read."""

    line_no: int  # 1-based
    endpoint: str  # kvern's endpoint name: chat, completions, ollama_chat, ollama_generate
    prompt: RequestPrompt
    model: str  # the body's model ("" when it names none)
    tenant: str
    ts_s: float | None  # when kvern captured it; None in a plain Batch file


@dataclass(slots=True)
class BadLines:
    """Lines that were not a request kvern can read: how many, and the first few with why."""

    count: int = 0
    listed: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)

    def add(self, line_no: int, why: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append((line_no, why))

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "lines": [{"line": n, "error": why} for n, why in self.listed],
        }


def endpoint_of_url(url: str) -> str | None:
    """kvern's endpoint name for a request URL, or None for one that carries no prompt."""
    path = url.split("?", 1)[0].rstrip("/")
    for suffix, name in _ENDPOINTS:
        if path.endswith(suffix):
            return name
    return None


def json_path(body: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (``user``, ``metadata.tenant``) in ``body``, or None."""
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def parse_line(
    raw: bytes, line_no: int, tenant_key: str | None
) -> tuple[LogLine | None, str | None]:
    """(the request, None) or (None, why the line is not one)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON: {str(exc)[:120]}"
    if not isinstance(data, dict):
        return None, f"not a JSON object but {type(data).__name__}"
    found_meta = data.get("kvern")
    meta: dict[str, Any] = found_meta if isinstance(found_meta, dict) else {}
    if "body" in data or "url" in data:
        body = data.get("body")
        if not isinstance(body, dict):
            return None, "its body is not a JSON object"
        endpoint = meta.get("endpoint") if isinstance(meta.get("endpoint"), str) else None
        if endpoint is None:
            url = data.get("url")
            if not isinstance(url, str):
                return None, "no url to tell the endpoint by"
            endpoint = endpoint_of_url(url)
            if endpoint is None:
                return None, f"url {url[:80]!r} carries no prompt kvern tracks"
    else:
        body = data
        endpoint = "chat" if "messages" in body else "completions"
    prompt = read_prompt(endpoint, body)
    if prompt is None:
        return None, f"no {endpoint} prompt in its body"
    model = body.get("model")
    tenant = meta.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        found = json_path(body, tenant_key) if tenant_key else None
        tenant = str(found) if isinstance(found, (str, int, float)) and found != "" else NO_TENANT
    ts = meta.get("ts_s")
    return (
        LogLine(
            line_no=line_no,
            endpoint=endpoint,
            prompt=prompt,
            model=model if isinstance(model, str) else "",
            tenant=tenant,
            ts_s=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
        ),
        None,
    )


class LogFile:
    """A log on disk, read as many times as asked (one pass per what-if), a line at a time."""

    def __init__(self, path: Path, *, tenant_key: str | None = None) -> None:
        self.path = path
        self.tenant_key = tenant_key
        self.size_bytes = path.stat().st_size
        self.bytes_read = 0  # of the pass under way

    def read(self, bad: BadLines | None = None) -> Iterator[LogLine]:
        """The requests in order; lines that are not one go to ``bad``; blank lines are skipped."""
        self.bytes_read = 0
        with self.path.open("rb") as handle:
            yield from self._lines(handle, bad)

    def _lines(self, handle: BinaryIO, bad: BadLines | None) -> Iterator[LogLine]:
        for line_no, raw in enumerate(handle, 1):
            self.bytes_read += len(raw)
            if not raw.strip():
                continue
            line, why = parse_line(raw, line_no, self.tenant_key)
            if line is not None:
                yield line
            elif bad is not None:
                bad.add(line_no, why or "unreadable")
