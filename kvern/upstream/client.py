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
        keepalive_expiry=config.keepalive_expiry_s,
    )
    return httpx.AsyncClient(
        timeout=timeout,
        transport=transport or ShardedPools(limits),
        follow_redirects=False,
        trust_env=False,
    )


def _root_os_error(exc: BaseException) -> OSError | None:
    """The first OS error with an errno down ``exc``'s chain of causes (what the socket said)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def describe(exc: BaseException) -> str:
    """What a transport error says, with the socket's own error when it has one.

    Why: httpx's errors often say little or nothing -- a reset reads
    ``ReadError('')``, a refused connect "All connection attempts failed" --
    while the errno that says what happened sits down the chain of causes.
    Failing both, the classes down the chain still say what kind of failure.
    """
    said = str(exc)
    root = _root_os_error(exc)
    if root is not None:
        errno_text = f"{type(root).__name__}: {root}"
        return errno_text if not said or said == str(root) else f"{said}; {errno_text}"
    if said:
        return said
    chain: list[str] = []
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 8:
        chain.append(f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(chain) or f"{type(exc).__name__} with no detail"


def _lost(exc: httpx.TransportError, doing: str) -> str:
    """A connection that broke while ``doing``: reset by the upstream, or lost some other way."""
    reset = isinstance(_root_os_error(exc), ConnectionResetError)
    how = "reset by the upstream" if reset else "lost"
    return f"connection {how} while {doing} ({describe(exc)})"


def _closed_early(exc: httpx.RemoteProtocolError) -> bool:
    """Whether the peer closed the connection (h11's wording), rather than sent non-HTTP bytes."""
    text = str(exc).lower()
    return "disconnect" in text or "closed" in text or "incomplete" in text or not text


@contextmanager
def mapped_errors(upstream: Upstream) -> Iterator[None]:
    """Translate httpx exceptions into kvern's upstream errors, naming the upstream.

    Every message says what happened, also when httpx's own says nothing (see
    :func:`describe`).
    """
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UpstreamTimeout(upstream.name, f"connect timed out ({describe(exc)})") from exc
    except httpx.ReadTimeout as exc:
        raise UpstreamTimeout(upstream.name, "read timed out waiting for the answer") from exc
    except httpx.WriteTimeout as exc:
        raise UpstreamTimeout(upstream.name, "write timed out sending the request") from exc
    except httpx.PoolTimeout as exc:
        raise UpstreamTimeout(upstream.name, "no free connection to the upstream in time") from exc
    except httpx.ConnectError as exc:
        raise UpstreamUnreachable(upstream.name, f"cannot connect ({describe(exc)})") from exc
    except httpx.ReadError as exc:
        raise UpstreamUnreachable(upstream.name, _lost(exc, "reading the answer")) from exc
    except httpx.WriteError as exc:
        raise UpstreamUnreachable(upstream.name, _lost(exc, "sending the request")) from exc
    except httpx.RemoteProtocolError as exc:
        if not _closed_early(exc):  # it answered, but not in HTTP (a bad status line...)
            raise UpstreamProtocolError(upstream.name, f"not valid HTTP ({describe(exc)})") from exc
        reason = f"connection closed early ({describe(exc)})"
        raise UpstreamUnreachable(upstream.name, reason) from exc
    except httpx.ProtocolError as exc:
        raise UpstreamProtocolError(upstream.name, f"protocol error ({describe(exc)})") from exc
    except httpx.TransportError as exc:
        raise UpstreamUnreachable(upstream.name, f"{type(exc).__name__}: {describe(exc)}") from exc
