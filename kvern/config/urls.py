"""Credentials out of every URL kvern shows: /health, errors, headers, analytics, logs.

Why in ``config``: upstream URLs come from the configuration, and operators
put credentials in them (``http://user:pass@host/v1``, ``?api-key=...``).
The URL with its credentials is what kvern sends to; everything it *shows*
goes through :func:`redact_url` or :func:`redact_text` first. Names derived
from a URL (the default upstream name) use :func:`host_port`, which has no
userinfo at all.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Query parameter names that carry a secret (api_key, api-key, access_token,
# token, key, sig, password...). Matched case-insensitively on the whole name.
_SECRET_PARAM = re.compile(
    r"^(?:.*[-_.])?(?:key|apikey|token|secret|password|passwd|pwd|auth|authorization|"
    r"signature|sig|credential|credentials|session)$",
    re.IGNORECASE,
)
# scheme://userinfo@ anywhere in free text (an httpx message, a log line).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s]+)@")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter of this name holds a credential."""
    return bool(_SECRET_PARAM.match(name))


def redact_query(query: str) -> str:
    """A query string with the values of secret-looking parameters replaced."""
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(is_secret_param(k) for k, _ in pairs):
        return query
    return urlencode([(k, REDACTED if is_secret_param(k) else v) for k, v in pairs], safe="*")


def host_port(url: str) -> str:
    """``host[:port]`` of a URL, with no userinfo: the default display name of an upstream."""
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[2]


def redact_url(url: str) -> str:
    """The URL as kvern shows it: userinfo and secret query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, redact_query(parts.query), parts.fragment))


def redact_text(text: str) -> str:
    """Free text with any ``scheme://user:pass@`` credentials replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
