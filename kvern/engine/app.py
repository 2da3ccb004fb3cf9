"""The engine's HTTP app: OpenAI chat and text completions, models, tokenize, health, metrics.

Why the first byte waits for prefill: a streamed answer's headers and first
chunk go out once the prompt is computed (the role chunk carries nothing
else), so a client -- and kvern in front -- sees time to first token as the
engine spent it, and requests are seen in the order the engine computed them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvern.engine import protocol
from kvern.engine.metrics import render_metrics
from kvern.engine.scheduler import Event, Failed, Finished, Job, Started, Text
from kvern.engine.service import EngineService
from kvern.errors import BadRequest, KvernError, ModelNotServed, error_response
from kvern.request_body import read_body

_MAX_BODY_BYTES = 32 << 20
_BODY_READ_TIMEOUT_S = 30.0  # a client that stalls mid-body lets its connection go


def create_engine_app(service: EngineService, *, own_service: bool = True) -> FastAPI:
    """The app serving ``service``; ``own_service``: start and stop its worker with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_service:
            service.start()
        try:
            yield
        finally:
            if own_service:
                service.stop()

    app = FastAPI(title="kvern engine", lifespan=lifespan)

    @app.exception_handler(KvernError)
    async def _kvern_error(request: Request, exc: KvernError) -> Response:
        return error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **service.facts()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.name,
                    "object": "model",
                    "created": int(service.started_s),
                    "owned_by": "kvern-engine",
                    "max_model_len": service.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics(service)
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's form: ``prompt`` (``add_special_tokens``) or ``messages``."""
        body = await _json(request)
        ids = await asyncio.to_thread(_prompt_ids, service, body, "auto")
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise BadRequest("tokens must be a list of token ids", param="tokens")
        return {"prompt": service.loaded.tokenizer.decode(tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(service, await _json(request), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(service, await _json(request), "text")

    return app


async def _json(request: Request) -> dict[str, Any]:
    raw = await read_body(request, _MAX_BODY_BYTES, _BODY_READ_TIMEOUT_S, "kvern engine's limit")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    except RecursionError:  # valid JSON nested past Python's parser: no request of the API
        raise BadRequest("the body is JSON nested too deeply to read") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _prompt_ids(service: EngineService, body: dict[str, Any], kind: str) -> list[int]:
    """The request's prompt as token ids: chat messages rendered, or the prompt text."""
    if kind in ("chat", "auto") and "messages" in body:
        messages = body["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise BadRequest("messages must be a non-empty list of objects", param="messages")
        extra: dict[str, Any] = {}
        if body.get("tools"):
            extra["tools"] = body["tools"]
        if kind == "auto" and body.get("add_generation_prompt") is False:
            extra["add_generation_prompt"] = False
        try:
            return service.chat_ids(messages, extra)
        except Exception as exc:  # the template's own error (a role it refuses)
            raise BadRequest(
                f"the chat template refused these messages: {exc}", param="messages"
            ) from None
    if kind == "chat":
        raise BadRequest("messages is required", param="messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        special = body.get("add_special_tokens", True) if kind == "auto" else True
        return service.text_ids(prompt, special=bool(special))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        vocab = len(service.loaded.tokenizer)
        if not all(0 <= t < vocab for t in prompt):
            raise BadRequest(
                f"a prompt token id is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        return list(prompt)
    raise BadRequest("prompt must be a string, or a list of token ids", param="prompt")


async def _complete(service: EngineService, body: dict[str, Any], kind: str) -> Response:
    model = body.get("model")
    if model is not None and model != service.name:
        raise ModelNotServed(f"the engine serves {service.name!r}, not {model!r}", param="model")
    ids = await asyncio.to_thread(_prompt_ids, service, body, kind)
    left = service.max_model_len - len(ids)
    if left <= 0:
        raise BadRequest(
            f"the prompt is {len(ids)} tokens; the model's context is {service.max_model_len}",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    params = protocol.sampling_params(body, left)
    loop = asyncio.get_running_loop()
    job, events = service.scheduler.submit_async(ids, params, loop)
    first = await _next(events, job)
    if isinstance(first, Failed):
        raise KvernError(first.message)
    assert isinstance(first, Started)
    rid = protocol.new_id(kind)
    name = service.name
    if body.get("stream"):
        stream = _stream(
            service, job, events, kind, rid, name, protocol.wants_usage_in_stream(body)
        )
        return StreamingResponse(stream, media_type="text/event-stream")
    parts: list[str] = []
    while True:
        event = await _next(events, job)
        if isinstance(event, Text):
            parts.append(event.delta)
        elif isinstance(event, Finished):
            _count(service, event)
            use = _usage(event)
            answer = protocol.whole_answer(kind, rid, name, "".join(parts), event.reason, use)
            return JSONResponse(answer)
        elif isinstance(event, Failed):
            raise KvernError(event.message)


async def _next(events: asyncio.Queue[Event], job: Job) -> Event:
    try:
        return await events.get()
    except asyncio.CancelledError:
        job.cancelled.set()  # the client left: the worker stops the request
        raise


async def _stream(
    service: EngineService,
    job: Job,
    events: asyncio.Queue[Event],
    kind: str,
    rid: str,
    name: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    try:
        if kind == "chat":
            yield protocol.sse(protocol.delta_chunk(kind, rid, name, created, None, None))
        while True:
            event = await _next(events, job)
            if isinstance(event, Text):
                yield protocol.sse(
                    protocol.delta_chunk(kind, rid, name, created, event.delta, None)
                )
            elif isinstance(event, Finished):
                _count(service, event)
                reason = "stop" if event.reason == "cancelled" else event.reason
                yield protocol.sse(protocol.delta_chunk(kind, rid, name, created, "", reason))
                if include_usage:
                    use = _usage(event)
                    yield protocol.sse(protocol.usage_chunk(rid, name, created, kind, use))
                yield protocol.SSE_DONE
                return
            elif isinstance(event, Failed):
                yield protocol.sse(KvernError(event.message, code="engine_error").body())
                return
    finally:
        job.cancelled.set()  # a no-op once finished; stops a request whose client left


def _usage(event: Finished) -> dict[str, Any]:
    return protocol.usage(
        event.prompt_tokens, event.cached_tokens, event.completion_tokens, event.chunk_reused_tokens
    )


def _count(service: EngineService, event: Finished) -> None:
    service.requests += 1
    service.prompt_tokens += event.prompt_tokens
    service.cached_tokens += event.cached_tokens
    service.chunk_reused_tokens += event.chunk_reused_tokens
    service.completion_tokens += event.completion_tokens
