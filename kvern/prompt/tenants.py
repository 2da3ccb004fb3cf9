"""Tenant ids: who sent a request, as a keyed hash nobody can reverse or guess.

Why keyed: analytics group requests by tenant, and a plain (even truncated)
sha256 of a ``user`` field such as an e-mail address is guessable by hashing
candidates. An HMAC with a secret only this deployment holds is not; the
same key or user still maps to the same id across requests and restarts, as
long as the secret stays (see :mod:`kvern.analytics.tenant_secret`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

# Hex digits kept: 64 bits, ample to tell a deployment's tenants apart.
_ID_HEX = 16


class TenantIds:
    """Maps an API key (the tenant) or a ``user`` field (an end user) to a keyed id."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the tenant secret must be at least 16 bytes")
        self._secret = secret

    def _digest(self, kind: str, value: str) -> str:
        # surrogatepass: a lone surrogate hashes too, and distinct values stay distinct.
        message = kind.encode() + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:_ID_HEX]

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant: who pays, i.e. the API key (bearer or not); None without one."""
        if authorization:
            key = authorization.removeprefix("Bearer ").strip()
            if key:
                return "key:" + self._digest("key", key)
        return None

    def end_user(self, body: dict[str, Any] | None) -> str | None:
        """The body's ``user`` field: an end user within a tenant; None without one.

        Kept apart from the tenant: one API key serving many users is one
        tenant, and a breakdown by end user is a second, optional view.
        """
        user = body.get("user") if isinstance(body, dict) else None
        if isinstance(user, str) and user:
            return "user:" + self._digest("user", user)
        return None
