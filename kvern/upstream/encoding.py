"""Reading a compressed answer for its usage figures, without touching what is relayed.

Why: kvern asks upstreams for ``Accept-Encoding: identity``, but a backend
(or a gateway in front of one) may compress anyway. The answer is relayed as
the upstream's raw bytes with its own ``Content-Encoding``, so the client
decodes it exactly as it would have directly; only kvern's side copy, which
the brain reads usage from, is decoded here. Bounded, because a small
compressed body can expand without limit, and lenient, because a false
``Content-Encoding`` header is the upstream's problem, not a reason to fail
the request: the copy is then unreadable and the row has no usage figures.
"""

from __future__ import annotations

import zlib

# gzip, or zlib-wrapped deflate (wbits 32+15: detect either header).
_AUTO_WBITS = 32 + zlib.MAX_WBITS


def readable_copy(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """``body`` decoded for reading (at most ``limit`` bytes); b"" when it cannot be."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return b""  # br, zstd, or a chain of them: the row goes without usage
    wbits = _AUTO_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    try:
        out = zlib.decompressobj(wbits).decompress(body, limit + 1)
    except zlib.error:
        if encoding != "deflate":
            return b""
        try:  # raw deflate, which some servers send for "deflate"
            out = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, limit + 1)
        except zlib.error:
            return b""
    return out if len(out) <= limit else b""
