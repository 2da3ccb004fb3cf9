"""The OpenAI wire format for the engine: reading requests, writing answers and stream chunks.

Why its own module: the routes should read as the request's path (parse,
submit, relay), and the field-by-field rules of the API -- which sampling
fields exist, their defaults, what a chunk and a usage object look like --
are one concept that tests can check without a model.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from kvern.engine.sampling import SamplingParams
from kvern.errors import BadRequest

_DEFAULT_MAX_TOKENS = 256


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number, got {value!r}", param=key)
    return float(value)


def sampling_params(body: dict[str, Any], context_left: int) -> SamplingParams:
    """The request's sampling fields; ``context_left``: tokens the context still has room for."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(_DEFAULT_MAX_TOKENS, context_left)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest(
            f"max_tokens must be a non-negative integer, got {max_tokens!r}", param="max_tokens"
        )
    if max_tokens > context_left:
        raise BadRequest(
            f"max_tokens {max_tokens} is more than the {context_left} tokens the model's "
            "context has left after the prompt",
            param="max_tokens",
        )
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise BadRequest("stop must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}", param="seed")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("the engine answers one choice per request (n must be 1)", param="n")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            seed=seed,
            stop=stops,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def wants_usage_in_stream(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def usage(
    prompt_tokens: int, cached_tokens: int, completion_tokens: int, chunk_reused_tokens: int = 0
) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens`` is the reused prefix only (exact, what kvern predicts).

    Tokens reused from chunks after a seam (opt-in, approximate) are counted
    apart, in ``prompt_tokens_details.chunk_reused_tokens``, when there are any.
    """
    details: dict[str, Any] = {"cached_tokens": cached_tokens}
    if chunk_reused_tokens:
        details["chunk_reused_tokens"] = chunk_reused_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
    }


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def delta_chunk(
    kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None
) -> dict[str, Any]:
    """A stream chunk: ``text`` (None: the role chunk that opens a chat), ``finish`` at the end."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if kind == "chat":
        if text is None:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["delta"] = {"content": text} if text else {}
        obj = "chat.completion.chunk"
    else:
        choice["text"] = text or ""
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(
    rid: str, model: str, created: int, kind: str, use: dict[str, Any]
) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": use,
    }


def whole_answer(
    kind: str, rid: str, model: str, text: str, finish: str, use: dict[str, Any]
) -> dict[str, Any]:
    created = int(time.time())
    if kind == "chat":
        message = {"role": "assistant", "content": text}
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": use,
    }
