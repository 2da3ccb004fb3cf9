"""Reading a client's request body within a size and a time limit.

Why one reader for the proxy and ``kvern engine``: both must refuse a body
over their limit before holding it (a declared ``content-length`` at once,
an undeclared or lying one as soon as the bytes pass the limit), and neither
may let a client that sends its headers and then stalls hold a connection
for ever. ``request.body()`` does neither: it reads everything first.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from kvern.errors import BodyReadTimeout, BodyTooLarge


async def read_body(request: Request, max_bytes: int, timeout_s: float, setting: str) -> bytes:
    """The whole body, refused past ``max_bytes``; ``timeout_s`` bounds each wait.

    ``setting`` names where the timeout comes from, for the error a stalled client gets.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    parts = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(parts.__anext__(), timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                raise BodyReadTimeout(
                    f"the request body did not arrive in time: no data for {timeout_s:g} s "
                    f"after {size} bytes ({setting})"
                ) from None
            if not chunk:
                # Starlette's stream ends with one empty chunk. Stopping there
                # ends the read without StopAsyncIteration: raised through
                # wait_for's task, it would tie that task, its frames and so
                # this request's whole object graph into a reference cycle
                # that only a garbage collection frees (every request, once).
                break
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(f"request body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    finally:
        await parts.aclose()
    return b"".join(chunks)
