"""Reading a request body: the whole of it, and nothing left for the garbage collector."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from starlette.requests import Request

from kvern.request_body import read_body


def chunked_request(chunks: list[bytes]) -> Request:
    """A Starlette request whose body arrives in ``chunks``, as uvicorn hands it over."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    return Request(scope, receive)


async def test_a_read_body_leaves_its_request_to_reference_counting() -> None:
    # The read once ended on StopAsyncIteration raised through wait_for's
    # task: task, exception and frames made a cycle holding this request and
    # everything hanging from it, on every request, until a collection ran.
    gc.collect()
    gc.disable()
    try:
        request = chunked_request([b'{"model": ', b'"m", ', b'"messages": []}'])
        alive = weakref.ref(request)
        body = await read_body(request, max_bytes=1 << 20, timeout_s=5.0, setting="test")
        del request
        assert body == b'{"model": "m", "messages": []}'
        assert alive() is None
    finally:
        gc.enable()


async def test_an_empty_body_reads_as_empty() -> None:
    assert await read_body(chunked_request([b""]), 1024, 5.0, "test") == b""
