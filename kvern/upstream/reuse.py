"""Sockets that know when a server dropped a reused connection before answering.

Why at the socket: httpcore raises the same ``RemoteProtocolError("Server
disconnected without sending a response.")`` whether the connection was new
or had served earlier requests, and whether nothing or half a status line
came back. Only one of those is safe to send again -- a reused connection,
closed with no byte of the answer (see :class:`kvern.upstream.pools.ShardedPools`)
-- and only the socket sees both facts: what it wrote and read, in order.

A connection's life as its socket sees it (HTTP/1.1, one request at a time)::

    write.. read.. | write.. read.. | write.. <EOF>
    request 1      | request 2      | request 3: reused, nothing read -> stale

A write after a read begins the next request; httpcore writes a whole
request before it reads the answer.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

STALE_MESSAGE = "Server disconnected a reused connection without sending a response."


class StaleConnection(httpcore.RemoteProtocolError):
    """The server closed or reset a reused connection before any byte of this answer.

    A :class:`httpcore.RemoteProtocolError`, so everything above httpcore
    (httpx's mapping, kvern's) treats it exactly as the error it replaces;
    httpx keeps it as the ``__cause__`` of the error it raises.
    """


class WatchedStream(httpcore.AsyncNetworkStream):
    """A socket counting the requests written on it and the answer bytes read since."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self.num_requests = 0  # requests begun on this connection
        self.answer_bytes = 0  # bytes read since the current request began
        self._last_was_read = True  # so the first write begins request 1

    @property
    def reused_unanswered(self) -> bool:
        """A request after an earlier one, and not one byte of its answer yet."""
        return self.num_requests > 1 and self.answer_bytes == 0

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer and self._last_was_read:
            self.num_requests += 1
            self.answer_bytes = 0
            self._last_was_read = False
        await self._stream.write(buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._last_was_read = True
        try:
            data = await self._stream.read(max_bytes, timeout)
        except httpcore.ReadError as exc:  # a reset: the same race, seen as RST
            if self.reused_unanswered:
                raise StaleConnection(STALE_MESSAGE) from exc
            raise
        if not data and self.reused_unanswered:
            raise StaleConnection(STALE_MESSAGE)
        self.answer_bytes += len(data)
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # TLS is set up before the first request: the new stream starts afresh.
        return WatchedStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class ReuseWatchingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend (anyio), handing out :class:`WatchedStream` sockets."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return WatchedStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )
        return WatchedStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)
