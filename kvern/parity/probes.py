"""How kvern asks each backend to render and tokenize, and how it finds the first difference.

Split from :mod:`kvern.parity.checker` (which decides when to check and what to
report): this module knows the endpoints, their answers, and how to describe a
difference so that a person can see it at a glance -- the position, about 40
characters of each side's text around it, and for tokens the ids and their
pieces (decoded with kvern's vocabulary) around it.

llama.cpp's server::

    POST /apply-template {messages}              -> {"prompt": text}   the template
    POST /tokenize {content: kvern's text,       -> {"tokens": [...]}  the tokenizer
                    add_special: false, parse_special: true}

vLLM::

    POST /tokenize {model, messages, add_generation_prompt: true}
                                                 -> {"tokens": [...], "count": n}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from kvern.tokenize.model_tokenizer import ModelTokenizer, PromptTokens
from kvern.upstream.client import Upstream, mapped_errors

ParityMethod = Literal["llamacpp", "vllm"]

# Statuses meaning "no such endpoint here".
NO_ENDPOINT = frozenset({404, 405, 501})
# Characters of context shown on each side of a difference, and token ids.
_CONTEXT_CHARS = 40
_CONTEXT_IDS = 8


class Unsupported(Exception):
    """The upstream offers no endpoint to compare with."""


class ProbeError(Exception):
    """The upstream answered something the check cannot use."""


@dataclass(slots=True)
class Outcome:
    """What a backend's answers showed (see :class:`kvern.parity.checker.ParityReport`)."""

    method: ParityMethod  # which backend's endpoints answered
    template_match: bool | None  # None: the backend shows no template text (vLLM)
    tokens_match: bool  # every sample's ids agree
    first_diff: dict[str, Any] | None  # the first difference, template before tokens
    detail: str | None  # which samples differ, and notes


class Probe:
    """POSTs JSON to the upstream's origin with a short timeout; decodes the answers."""

    def __init__(
        self, client: httpx.AsyncClient, upstream: Upstream, model: str, timeout_s: float
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.model = model
        self.timeout_s = timeout_s

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        with mapped_errors(self.upstream):
            return await self.client.post(
                self.upstream.origin + path, json=body, timeout=self.timeout_s
            )

    @staticmethod
    def field(response: httpx.Response, path: str, name: str) -> Any:
        """``response.json()[name]`` of a 200 answer, or a :class:`ProbeError` saying why not."""
        if response.status_code != 200:
            raise ProbeError(
                f"POST {path} answered HTTP {response.status_code}: {response.text[:200]}"
            )
        try:
            data = response.json()
        except ValueError:
            raise ProbeError(f"POST {path} answered non-JSON: {response.text[:200]!r}") from None
        if not isinstance(data, dict) or name not in data:
            raise ProbeError(f"POST {path} answered without {name!r}: {response.text[:200]}")
        return data[name]

    @staticmethod
    def ids(value: Any, path: str) -> list[int]:
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise ProbeError(f"POST {path} answered tokens that are not a list of ids")
        return value

    async def llamacpp_template(self, messages: list[dict[str, Any]]) -> httpx.Response:
        # "model" is ignored by a single-model server and routes a multi-model one.
        return await self.post("/apply-template", {"model": self.model, "messages": messages})

    async def llamacpp_tokenize(self, text: str, *, add_special: bool) -> list[int]:
        body = {
            "model": self.model,
            "content": text,
            "add_special": add_special,
            "parse_special": True,
        }
        answer = await self.post("/tokenize", body)
        return self.ids(self.field(answer, "/tokenize", "tokens"), "/tokenize")

    async def llamacpp_detokenize(self, ids: list[int]) -> str:
        body = {"model": self.model, "tokens": ids}
        text = self.field(await self.post("/detokenize", body), "/detokenize", "content")
        if not isinstance(text, str):
            raise ProbeError("POST /detokenize answered non-text content")
        return text

    async def vllm_tokenize(self, messages: list[dict[str, Any]]) -> httpx.Response:
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        return await self.post("/tokenize", body)


def _first_diff_index(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Index of the first difference; the shorter length if one is a prefix; None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _around(text: str, pos: int) -> tuple[str, int]:
    """``text`` within the context window around ``pos``, and where ``pos`` falls in it."""
    start = max(0, pos - _CONTEXT_CHARS)
    return text[start : pos + _CONTEXT_CHARS], pos - start


def _text_diff(sample: int, pos: int, ours: str, theirs: str) -> dict[str, Any]:
    kvern, offset = _around(ours, pos)
    upstream, _ = _around(theirs, pos)
    return {
        "part": "template",
        "sample": sample,
        "position": pos,
        "offset": offset,
        "kvern": kvern,
        "upstream": upstream,
        "kvern_chars": len(ours),
        "upstream_chars": len(theirs),
    }


def _ids_diff(
    tokenizer: ModelTokenizer, sample: int, pos: int, ours: Sequence[int], theirs: Sequence[int]
) -> dict[str, Any]:
    """Token difference at ``pos``, with text decoded by kvern's tokenizer (both sides).

    The upstream's ids are decoded with kvern's vocabulary: where the two
    vocabularies agree (the usual case) that is the upstream's text.
    """

    def snippet(ids: Sequence[int]) -> tuple[str, int]:
        try:
            before = tokenizer.decode(ids[:pos])
            after = tokenizer.decode(ids[pos:])
        except Exception as exc:  # noqa: BLE001 - ids outside kvern's vocabulary
            return f"<cannot decode: {type(exc).__name__}>", 0
        return before[-_CONTEXT_CHARS:] + after[:_CONTEXT_CHARS], len(before[-_CONTEXT_CHARS:])

    def pieces(ids: Sequence[int]) -> list[str]:
        out = []
        for t in ids:
            try:
                out.append(tokenizer.decode([t]))
            except Exception:  # noqa: BLE001
                out.append("?")
        return out

    lo = max(0, pos - _CONTEXT_IDS)
    kvern, offset = snippet(ours)
    upstream, _ = snippet(theirs)
    return {
        "part": "tokens",
        "sample": sample,
        "position": pos,
        "offset": offset,
        "kvern": kvern,
        "upstream": upstream,
        "ids_start": lo,
        "kvern_ids": list(ours[lo : pos + _CONTEXT_IDS]),
        "upstream_ids": list(theirs[lo : pos + _CONTEXT_IDS]),
        "kvern_pieces": pieces(ours[lo : pos + _CONTEXT_IDS]),
        "upstream_pieces": pieces(theirs[lo : pos + _CONTEXT_IDS]),
        "kvern_tokens": len(ours),
        "upstream_tokens": len(theirs),
    }


def _summary(template_samples: list[int], token_samples: list[int], notes: list[str]) -> str | None:
    parts = []
    if template_samples:
        parts.append(f"template differs in samples {template_samples}")
    if token_samples:
        parts.append(f"tokens differ in samples {token_samples}")
    parts.extend(notes)
    return "; ".join(parts) or None


async def compare_llamacpp(
    probe: Probe,
    tokenizer: ModelTokenizer,
    chats: Sequence[list[dict[str, Any]]],
    ours: Sequence[PromptTokens],
    first_answer: httpx.Response,
    notes: list[str],
) -> Outcome:
    prefix_ids = await probe.llamacpp_tokenize("", add_special=True)
    prefix = await probe.llamacpp_detokenize(prefix_ids) if prefix_ids else ""
    template_diff: dict[str, Any] | None = None
    token_diff: dict[str, Any] | None = None
    template_samples: list[int] = []
    token_samples: list[int] = []
    for i, (chat, mine) in enumerate(zip(chats, ours, strict=True)):
        answer = first_answer if i == 0 else await probe.llamacpp_template(chat)
        prompt = probe.field(answer, "/apply-template", "prompt")
        if not isinstance(prompt, str):
            raise ProbeError("POST /apply-template answered a non-text prompt")
        theirs_text = prefix + prompt
        pos = _first_diff_index(mine.text, theirs_text)
        if pos is not None:
            template_samples.append(i)
            template_diff = template_diff or _text_diff(i, pos, mine.text, theirs_text)
        # kvern's own text, tokenized upstream: a tokenizer difference alone.
        theirs_ids = await probe.llamacpp_tokenize(mine.text, add_special=False)
        pos = _first_diff_index(mine.ids, theirs_ids)
        if pos is not None:
            token_samples.append(i)
            token_diff = token_diff or _ids_diff(tokenizer, i, pos, mine.ids, theirs_ids)
    return Outcome(
        method="llamacpp",
        template_match=not template_samples,
        tokens_match=not token_samples,
        first_diff=template_diff or token_diff,
        detail=_summary(template_samples, token_samples, notes),
    )


async def compare_vllm(
    probe: Probe,
    tokenizer: ModelTokenizer,
    chats: Sequence[list[dict[str, Any]]],
    ours: Sequence[PromptTokens],
    notes: list[str],
) -> Outcome:
    token_diff: dict[str, Any] | None = None
    token_samples: list[int] = []
    for i, (chat, mine) in enumerate(zip(chats, ours, strict=True)):
        answer = await probe.vllm_tokenize(chat)
        if i == 0 and answer.status_code in NO_ENDPOINT:
            message = _error_message(answer)
            if message is not None and probe.model in message:  # vLLM: no such model
                raise ProbeError(f"upstream does not serve {probe.model!r}: {message[:200]}")
            raise Unsupported(
                "upstream has neither llama.cpp's /apply-template nor vLLM's /tokenize "
                f"(HTTP {answer.status_code})"
            )
        theirs = probe.ids(probe.field(answer, "/tokenize", "tokens"), "/tokenize")
        if not theirs:
            raise Unsupported("/tokenize answered no tokens for a chat (not vLLM's /tokenize)")
        pos = _first_diff_index(mine.ids, theirs)
        if pos is not None:
            token_samples.append(i)
            token_diff = token_diff or _ids_diff(tokenizer, i, pos, mine.ids, theirs)
    return Outcome(
        method="vllm",
        template_match=None,
        tokens_match=not token_samples,
        first_diff=token_diff,
        detail=_summary([], token_samples, notes),
    )


def _error_message(response: httpx.Response) -> str | None:
    """The message of an OpenAI-shaped error body (vLLM writes both shapes), if any."""
    try:
        data = response.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else data.get("message")
    return message if isinstance(message, str) else None
