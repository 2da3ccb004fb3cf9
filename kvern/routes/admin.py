"""The admin key: who may read kvern's own pages.

Why: /analytics, /trie/visualize and the detailed /health show what flows
through kvern — /trie/visualize decodes prompt prefixes, system prompts
included — so once ``proxy.admin_api_key`` (or ``KVERN_ADMIN_KEY``) is set
they need it, as ``Authorization: Bearer <key>`` or ``x-kvern-admin-key``.
The comparison is constant-time. Pages are guarded by being registered with
:func:`require_admin` as a dependency (see ``create_app``), so a new admin
page is guarded by where it is mounted, not by remembering a check. The proxy
path is never guarded here: the client's own ``Authorization`` goes upstream.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from kvern.errors import AdminKeyRequired
from kvern.services import Services

ADMIN_HEADER = "x-kvern-admin-key"


def presented_key(request: Request) -> str | None:
    """The key a request presents: the admin header, else a bearer token."""
    key = request.headers.get(ADMIN_HEADER)
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def is_admin(request: Request) -> bool:
    """True when no admin key is configured, or the request presents it."""
    services: Services = request.app.state.services
    expected = services.config.proxy.admin_api_key
    if expected is None:
        return True
    given = presented_key(request)
    if given is None:
        return False
    # compare_digest on bytes: constant-time, and any characters are fine.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


async def require_admin(request: Request) -> None:
    """A dependency of every admin page: 401 (OpenAI-shaped) without the key."""
    if not is_admin(request):
        raise AdminKeyRequired(
            "this kvern page needs the admin key (proxy.admin_api_key): send it as "
            f"'Authorization: Bearer <key>' or '{ADMIN_HEADER}: <key>'"
        )
