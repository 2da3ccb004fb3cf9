"""The upstream: where a request goes, which headers travel, and httpx errors mapped once.

Why a module of its own: forwarding must be byte-exact and header-correct for
every OpenAI-compatible backend (Ollama, vLLM, llama.cpp's server, hosted
APIs), and every transport failure must become the same small set of kvern
errors (502 unreachable, 504 timeout) that name the upstream. The transport is
a parameter so tests can inject ``httpx.MockTransport`` for fault injection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from kvern.config import UpstreamConfig
from kvern.config.urls import host_port, redact_url
from kvern.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from kvern.upstream.pools import ShardedPools

# RFC 9110 7.6.1 hop-by-hop headers, plus those httpx/uvicorn set themselves.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible backend."""

    name: str  # shown in errors, analytics and /health (host:port unless configured)
    base_url: str  # with its API prefix, e.g. http://127.0.0.1:11434/v1 (credentials kept)
    origin: str  # base_url without a trailing /v1: where Ollama's /api/* lives

    @property
    def shown_url(self) -> str:
        """``base_url`` as kvern shows it: credentials replaced (only sending uses the real one)."""
        return redact_url(self.base_url)

    @classmethod
    def from_config(cls, config: UpstreamConfig, name: str | None = None) -> Upstream:
        return cls.at(config.base_url, name)

    @classmethod
    def at(cls, base_url: str, name: str | None = None) -> Upstream:
        """The upstream at ``base_url`` (its API prefix included); named host:port by default.

        The default name never holds the URL's userinfo: it is shown everywhere.
        """
        base = base_url.rstrip("/")
        origin = base[: -len("/v1")] if base.endswith("/v1") else base
        return cls(name or host_port(base), base, origin)

    def url_for(self, path: str, query: str = "") -> str:
        """Map kvern's request path to the upstream URL.

        ``/v1/<rest>`` goes to ``base_url/<rest>``; anything else (Ollama's
        ``/api/*``) goes to the origin with its path unchanged.
        """
        if path == "/v1" or path.startswith("/v1/"):
            url = self.base_url + path[len("/v1") :]
        else:
            url = self.origin + path
        return f"{url}?{query}" if query else url


def forward_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Client request headers minus hop-by-hop ones; compression is turned off upstream.

    ``Accept-Encoding: identity`` keeps the upstream's bytes readable for the
    side reader (usage, cached tokens) while kvern relays them unchanged;
    compressing on a link to a model server buys nothing. Values stay the
    client's bytes: a header value need not be ASCII (HTTP allows any octet
    but controls), and kvern forwards what it got rather than failing on it.
    """
    out = [
        (k, v)
        for k, v in headers
        if (name := k.decode("latin-1").lower()) not in HOP_BY_HOP and name != "accept-encoding"
    ]
    out.append((b"accept-encoding", b"identity"))
    return out


def response_headers(headers: Mapping[str, str] | httpx.Headers) -> dict[str, str]:
    """Upstream response headers to relay (hop-by-hop ones are the server's own business)."""
    items = headers.multi_items() if isinstance(headers, httpx.Headers) else headers.items()
    return {k: v for k, v in items if k.lower() not in HOP_BY_HOP}


def build_client(
    config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    """One pooled, keep-alive client for the process (timeouts and limits from config).

    Its connections are split over small pools (:mod:`kvern.upstream.pools`)
    unless a test hands in its own ``transport``.
    """
    timeout = httpx.Timeout(
        connect=config.connect_timeout_s,
        read=config.read_timeout_s,
        write=config.write_timeout_s,
        pool=config.pool_timeout_s,
    )
    limits = httpx.Limits(
        max_connections=config.max_connections,
        max_keepalive_connections=config.max_keepalive_connections,
    )
    return httpx.AsyncClient(
        timeout=timeout,
        transport=transport or ShardedPools(limits),
        follow_redirects=False,
        trust_env=False,
    )


@contextmanager
def mapped_errors(upstream: Upstream) -> Iterator[None]:
    """Translate httpx exceptions into kvern's upstream errors, naming the upstream."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UpstreamTimeout(upstream.name, f"connect timed out ({exc})") from exc
    except httpx.ReadTimeout as exc:
        raise UpstreamTimeout(upstream.name, "read timed out waiting for the answer") from exc
    except httpx.WriteTimeout as exc:
        raise UpstreamTimeout(upstream.name, "write timed out sending the request") from exc
    except httpx.PoolTimeout as exc:
        raise UpstreamTimeout(upstream.name, "no free connection to the upstream in time") from exc
    except httpx.ConnectError as exc:
        raise UpstreamUnreachable(upstream.name, f"cannot connect ({exc or 'refused'})") from exc
    except httpx.RemoteProtocolError as exc:
        raise UpstreamUnreachable(upstream.name, f"connection closed early ({exc})") from exc
    except httpx.ProtocolError as exc:
        raise UpstreamProtocolError(upstream.name, f"protocol error ({exc})") from exc
    except httpx.TransportError as exc:
        raise UpstreamUnreachable(upstream.name, f"{type(exc).__name__}: {exc}") from exc
