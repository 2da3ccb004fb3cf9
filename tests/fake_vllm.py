"""A small OpenAI-compatible upstream that behaves like vLLM on the wire.

It renders chat requests with the model's real HF chat template and tokenizer
(as vLLM does), keeps a real prefix cache of 16-token blocks (chained hashes of
full blocks, as vLLM's prefix caching does), and reports
``usage.prompt_tokens_details.cached_tokens`` honestly. Streams are SSE with a
role chunk, content chunks, a finish chunk, an optional usage chunk
(``stream_options.include_usage``) and ``data: [DONE]``.

Fault injection through request headers: ``x-fake-status`` (answer with that
status and an OpenAI error body), ``x-fake-delay-ms`` (sleep before the
answer), ``x-fake-chunk-delay-ms`` (sleep between stream chunks),
``x-fake-chunks`` (number of content chunks).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

BLOCK_TOKENS = 16


@dataclass
class FakeVLLMState:
    """What the fake upstream saw, for assertions."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # cached_tokens reported per request
    prompt_tokens: list[int] = field(default_factory=list)
    disconnects: int = 0
    completed_streams: int = 0
    blocks: set[int] = field(default_factory=set)


def _cached_tokens(state: FakeVLLMState, ids: list[int]) -> int:
    """vLLM: full blocks only, and the last prompt token is always computed."""
    parent = 0
    cached = 0
    usable = (len(ids) - 1) // BLOCK_TOKENS
    hashes = []
    for b in range(len(ids) // BLOCK_TOKENS):
        parent = hash((parent, tuple(ids[b * BLOCK_TOKENS : (b + 1) * BLOCK_TOKENS])))
        hashes.append(parent)
    for b in range(usable):
        if hashes[b] not in state.blocks:
            break
        cached += BLOCK_TOKENS
    state.blocks.update(hashes)
    return cached


def _invalid(body: Any, chat: bool) -> str | None:
    """What vLLM's request validation would refuse, as its message; None: acceptable."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "model: Field required"
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return "messages: each message needs a role"
    return None


def create_fake_vllm(tokenizers: dict[str, Any]) -> tuple[Starlette, FakeVLLMState]:
    """``tokenizers``: model name -> HF tokenizer (with chat template)."""
    state = FakeVLLMState()

    def prompt_ids(body: dict[str, Any], chat: bool) -> list[int]:
        tok = tokenizers.get(body.get("model", "")) or next(iter(tokenizers.values()))
        if chat:
            text = tok.apply_chat_template(
                body["messages"],
                tools=body.get("tools"),
                add_generation_prompt=True,
                tokenize=False,
            )
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(str(body.get("prompt", "")), add_special_tokens=True))

    async def completions(request: Request, chat: bool) -> Response:
        raw = await request.body()
        state.raw_bodies.append(raw)
        state.headers.append(dict(request.headers))
        body = json.loads(raw)
        state.requests.append(body)
        delay_ms = float(request.headers.get("x-fake-delay-ms", "0"))
        if delay_ms:
            # "Prefill": like vLLM, abort when the client goes away meanwhile.
            deadline = time.monotonic() + delay_ms / 1000
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    state.disconnects += 1
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
        status = int(request.headers.get("x-fake-status", "200"))
        if status != 200:
            return JSONResponse(
                {"error": {"message": "injected failure", "type": "server_error", "code": status}},
                status_code=status,
            )
        problem = _invalid(body, chat)
        if problem is not None:  # vLLM's own 400, in its own shape
            return JSONResponse(
                {"object": "error", "message": problem, "type": "BadRequestError", "code": 400},
                status_code=400,
            )
        ids = prompt_ids(body, chat)
        cached = _cached_tokens(state, ids)
        state.cached.append(cached)
        state.prompt_tokens.append(len(ids))
        n_chunks = int(request.headers.get("x-fake-chunks", "4"))
        words = [f"word{i} " for i in range(n_chunks)]
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": n_chunks,
            "total_tokens": len(ids) + n_chunks,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        rid = f"cmpl-{len(state.requests)}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(words)}
            else:
                choice["text"] = "".join(words)
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                }
            )
        chunk_delay = float(request.headers.get("x-fake-chunk-delay-ms", "0")) / 1000
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(payload: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        def chunk(delta: dict[str, Any] | None, text: str | None, finish: str | None) -> bytes:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = delta or {}
            else:
                c["text"] = text or ""
            return event(
                {
                    "id": rid,
                    "object": obj + ".chunk",
                    "created": created,
                    "model": body["model"],
                    "choices": [c],
                }
            )

        async def stream() -> Any:
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None, None)
                for w in words:
                    if chunk_delay:
                        await asyncio.sleep(chunk_delay)
                    yield chunk({"content": w}, w, None)
                yield chunk({}, "", "stop")
                if include_usage:
                    yield event(
                        {
                            "id": rid,
                            "object": obj + ".chunk",
                            "created": created,
                            "model": body["model"],
                            "choices": [],
                            "usage": usage,
                        }
                    )
                yield b"data: [DONE]\n\n"
                state.completed_streams += 1
            except (asyncio.CancelledError, GeneratorExit):
                state.disconnects += 1
                raise

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text(request: Request) -> Response:
        return await completions(request, chat=False)

    async def models(request: Request) -> Response:
        state.headers.append(dict(request.headers))
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in tokenizers
                ],
            }
        )

    async def ollama_chat(request: Request) -> Response:
        """Ollama's native /api/chat: NDJSON lines, a final object with prompt_eval_count."""
        raw = await request.body()
        state.raw_bodies.append(raw)
        body = json.loads(raw)
        state.requests.append(body)
        ids = prompt_ids(body, chat=True)
        cached = _cached_tokens(state, ids)
        state.cached.append(cached)
        state.prompt_tokens.append(len(ids))
        message = {"role": "assistant", "content": ""}
        lines: list[dict[str, Any]] = [
            {"model": body["model"], "message": {**message, "content": f"w{i} "}, "done": False}
            for i in range(3)
        ]
        lines.append(
            {
                "model": body["model"],
                "message": message,
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": len(ids) - cached,
                "eval_count": 3,
            }
        )
        if body.get("stream", True):
            text = "".join(json.dumps(line) + "\n" for line in lines)
            return Response(text, media_type="application/x-ndjson")
        return JSONResponse({**lines[-1], "message": {**message, "content": "w0 w1 w2 "}})

    async def ollama_tags(request: Request) -> Response:
        return JSONResponse({"models": [{"name": m} for m in tokenizers]})

    app = Starlette(
        routes=[
            Route("/api/chat", ollama_chat, methods=["POST"]),
            Route("/api/tags", ollama_tags, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", text, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    return app, state
